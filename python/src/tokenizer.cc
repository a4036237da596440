// icecache._tokenizer: the C++ byte-level BPE tokenizer of a GGUF model (model/io/tokenizer.h)
// for Python. It is the reference for token ids: it applies the `smollm` pre-tokenizer's digit
// split as llama.cpp does, which the tokenizer transformers builds from the same GGUF lacks
// (docs/client.md, "Python"). A thin binding: file reading and encoding are the C++ code's.
#include "model/io/tokenizer.h"

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "model/io/gguf.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using icecache::model::GgufFile;
using icecache::model::Tokenizer;
using icecache::model::TokenizerSpecFromGguf;

// Raises the icecache.errors exception of a non-OK status.
void Check(const absl::Status& status) {
  if (status.ok()) return;
  nb::object errors = nb::module_::import_("icecache.errors");
  nb::object exc = errors.attr("error_from_status")(static_cast<int>(status.code()),
                                                    std::string(status.message()));
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  throw nb::python_error();
}

std::unique_ptr<Tokenizer> FromFile(const std::string& path) {
  auto file = GgufFile::Open(path);
  Check(file.status());
  auto spec = TokenizerSpecFromGguf(**file);
  Check(spec.status());
  auto tokenizer = Tokenizer::Create(*std::move(spec));
  Check(tokenizer.status());
  return std::make_unique<Tokenizer>(*std::move(tokenizer));
}

// Text of tokenizer output, invalid UTF-8 replaced (a token may hold part of a character).
nb::str ReplacingDecode(const std::string& s) {
  return nb::steal<nb::str>(PyUnicode_DecodeUTF8(s.data(), s.size(), "replace"));
}

}  // namespace

NB_MODULE(_tokenizer, m) {
  m.doc() = "The C++ tokenizer of a GGUF model (the reference for token ids).";
  nb::class_<Tokenizer>(m, "GgufTokenizer",
                        "Byte-level BPE tokenizer built from a GGUF file's metadata, with the "
                        "model's pre-tokenizer (smollm: digits split first, as llama.cpp).")
      .def_static("from_file", &FromFile, "path"_a,
                  "Reads the tokenizer of the GGUF file at `path`. Raises NotFoundError or "
                  "InvalidArgumentError for a file without a usable tokenizer.")
      .def(
          "encode",
          [](const Tokenizer& t, nb::bytes text, bool parse_special) {
            return t.Encode(absl::string_view(text.c_str(), text.size()), parse_special);
          },
          "text"_a, "parse_special"_a = true,
          "Token ids of UTF-8 bytes (no BOS added); parse_special: control tokens written in "
          "the text become that token.")
      .def(
          "encode",
          [](const Tokenizer& t, const std::string& text, bool parse_special) {
            return t.Encode(text, parse_special);
          },
          "text"_a, "parse_special"_a = true, "Token ids of a str (encoded as UTF-8).")
      .def(
          "decode_bytes",
          [](const Tokenizer& t, const std::vector<int32_t>& ids) {
            const std::string s = t.Decode(ids);
            return nb::bytes(s.data(), s.size());
          },
          "ids"_a, "The bytes of the tokens, concatenated.")
      .def(
          "decode",
          [](const Tokenizer& t, const std::vector<int32_t>& ids) {
            return ReplacingDecode(t.Decode(ids));
          },
          "ids"_a, "The text of the tokens (invalid UTF-8 replaced).")
      .def(
          "token_text",
          [](const Tokenizer& t, int32_t id) {
            // One token's bytes may be part of a UTF-8 character (byte tokens): replaced, as
            // decode() does, instead of a UnicodeDecodeError; token_bytes() has the bytes.
            return ReplacingDecode(t.TokenText(id));
          },
          "id"_a, "The decoded text of one token (invalid UTF-8 replaced).")
      .def(
          "token_bytes",
          [](const Tokenizer& t, int32_t id) {
            const std::string s = t.TokenText(id);
            return nb::bytes(s.data(), s.size());
          },
          "id"_a, "The decoded bytes of one token.")
      .def_prop_ro("vocab_size", &Tokenizer::vocab_size)
      .def_prop_ro("bos_id", &Tokenizer::bos_id, "-1 when none.")
      .def_prop_ro("eos_id", &Tokenizer::eos_id, "-1 when none.")
      .def_prop_ro("pre", &Tokenizer::pre, "The pre-tokenizer's name (tokenizer.ggml.pre).");
}
