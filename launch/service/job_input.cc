// Job input rendering (see job_input.h).
#include "launch/service/job_input.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace dmsrt {

namespace {
grpc::Status Invalid(const std::string& msg) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, msg);
}
}  // namespace

grpc::Status RenderJobInput(const v1::JobRequest& req, const TokenizerSpec& spec,
                            int64_t max_prompt_bytes, std::string* rendered) {
  std::vector<ChatMessage> messages;
  int64_t bytes = 0;
  switch (req.input_case()) {
    case v1::JobRequest::kPrompt: *rendered = req.prompt(); bytes = req.prompt().size(); break;
    case v1::JobRequest::kChat:
      messages.push_back(ChatMessage{"user", req.chat()});
      bytes = req.chat().size();
      break;
    case v1::JobRequest::kConversation:
      if (req.conversation().messages().empty()) {
        return Invalid("conversation.messages is empty: send at least one user message");
      }
      for (const v1::ChatMessage& m : req.conversation().messages()) {
        if (m.role() != "system" && m.role() != "user" && m.role() != "assistant") {
          return Invalid(absl::StrCat("conversation role '", m.role(),
                                      "' is not one of system, user, assistant"));
        }
        messages.push_back(ChatMessage{m.role(), m.content()});
        bytes += m.content().size();
      }
      break;
    default:
      return Invalid("the request has no input: set `prompt` (raw text), `chat` (a user message) or "
                     "`conversation` (a message list)");
  }
  if (bytes == 0) return Invalid("the prompt is empty: send a non-empty `prompt`, `chat` or `conversation`");
  if (bytes > max_prompt_bytes) {
    return Invalid(absl::StrFormat("the prompt is %d bytes; the limit is %d: shorten it", bytes,
                                   max_prompt_bytes));
  }
  if (messages.empty()) return grpc::Status::OK;
  absl::StatusOr<std::string> r = ApplyChatTemplate(spec, messages, true);
  if (!r.ok()) return Invalid(absl::StrCat("cannot render the chat: ", r.status().message()));
  *rendered = *r;
  return grpc::Status::OK;
}

}  // namespace dmsrt
