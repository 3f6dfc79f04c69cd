// Stop-string matching on streamed text.
//
// Text arrives in pieces (whole UTF-8 characters, from StreamDecoder). Push() returns the part
// that is safe to emit: text that cannot be the start of a stop string. When a stop string
// completes, matched() turns true, the text before it is emitted and everything from the stop
// string on is dropped (the stop string is not part of the output, as in the OpenAI and vLLM APIs).
#pragma once

#include <string>
#include <vector>

namespace dmsrt {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);
  // Feeds a piece of text; returns what may be emitted now.
  std::string Push(const std::string& piece);
  // At the end of generation: returns the held-back tail (no stop string matched it).
  std::string Flush();
  bool matched() const { return matched_; }
  const std::string& matched_stop() const { return matched_stop_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool matched_ = false;
  std::string matched_stop_;
};

}  // namespace dmsrt
