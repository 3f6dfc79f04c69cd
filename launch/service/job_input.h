// The text a JobRequest's input stands for: the raw prompt, or the chat / conversation rendered
// with the model's chat template (with the generation prompt appended). Shared by the gRPC and
// HTTP front doors through Coordinator::CreateJob.
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <string>

#include "dmsrt/v1/dmsrt.pb.h"
#include "runtime/tokenizer/tokenizer.h"

namespace dmsrt {

// INVALID_ARGUMENT with a message saying what to change when the input is missing, empty, over
// `max_prompt_bytes`, has an unknown role, or cannot be rendered.
grpc::Status RenderJobInput(const v1::JobRequest& req, const TokenizerSpec& spec,
                            int64_t max_prompt_bytes, std::string* rendered);

}  // namespace dmsrt
