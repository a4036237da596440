// libFuzzer target: the GGUF reader and the tokenizer built from a GGUF's metadata. Each input
// is a whole file: GgufFile::Open must accept it or say INVALID_ARGUMENT, and everything it
// accepted must be readable through every accessor without a sanitizer report.
#include <sys/mman.h>
#include <unistd.h>

#include <string>

#include "model/io/gguf.h"
#include "model/io/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace icecache::model;
  const int fd = ::memfd_create("gguf", MFD_CLOEXEC);
  if (fd < 0) ::abort();
  if (size > 0 && ::write(fd, data, size) != static_cast<ssize_t>(size)) ::abort();
  absl::StatusOr<std::unique_ptr<GgufFile>> f =
      GgufFile::Open("/proc/self/fd/" + std::to_string(fd));
  ::close(fd);
  if (!f.ok()) {
    if (f.status().code() != absl::StatusCode::kInvalidArgument) ::abort();
    return 0;
  }
  const GgufFile& g = **f;
  for (const std::string& key : g.Keys()) {
    (void)g.TypeOf(key);
    (void)g.ArrayInfo(key);
    (void)g.GetString(key);
    (void)g.GetUint(key);
    (void)g.GetInt(key);
    (void)g.GetFloat(key);
    (void)g.GetBool(key);
    (void)g.GetStringArray(key);
    (void)g.GetIntArray(key);
    (void)g.GetFloatArray(key);
  }
  uint64_t sum = 0;
  for (const GgufTensor& t : g.tensors()) {
    if (g.FindTensor(t.name) == nullptr) ::abort();
    // The data Open vouched for lies in the file: its first and last bytes are readable.
    if (t.bytes > 0) sum += t.data[0] + t.data[t.bytes - 1];
  }
  (void)sum;
  absl::StatusOr<TokenizerSpec> spec = TokenizerSpecFromGguf(g);
  if (spec.ok() && spec->tokens.size() <= 4096) {
    absl::StatusOr<Tokenizer> tok = Tokenizer::Create(*spec);
    if (tok.ok()) (void)tok->Decode(tok->Encode("Hello, world! 123 <|im_start|>"));
  }
  return 0;
}
