// A read-only memory mapping of a whole file, used for model weights (GGUF, safetensors) so that
// tensors are views into the page cache instead of copies.
//
// mmap keeps load time independent of model size and lets the OS share pages between processes
// on one host. An empty file maps to an empty, valid view (mmap of length 0 is not allowed).
// Movable, not copyable; the mapping lives until the object is destroyed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace dmsrt {

// The whole of a (small, text) file as a string: NOT_FOUND "cannot read PATH: reason" when it
// cannot be opened or read.
absl::StatusOr<std::string> ReadWholeFile(const std::string& path);

class MappedFile {
 public:
  // Opens and maps `path` read-only. Errors name the file and the failing system call.
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);
  // Copies bytes already in memory, for parsers run on buffers (fuzzing, tests). The copy is
  // only 16-byte aligned, so tensor views into it may be less aligned than in a mapped file.
  static std::unique_ptr<MappedFile> FromBytes(const uint8_t* data, size_t size,
                                               const std::string& name);

  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;               // true: munmap in the destructor
  std::unique_ptr<uint8_t[]> owned_;  // FromBytes storage
  std::string path_;
};

}  // namespace dmsrt
