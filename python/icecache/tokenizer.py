"""The C++ tokenizer of a GGUF model (model/io/tokenizer.h), the reference for token ids.

Use it, not the tokenizer transformers builds from a GGUF file, to make token ids for the
SmolLM2 GGUF: that one lacks the `smollm` pre-tokenizer's digit split (llama.cpp splits every
``\\p{N}`` first), so on text such as ``"====\\n\\n\\n1."`` it yields ``"\\n\\n"`` + ``"\\n"``
where this one (and llama.cpp) yield one ``"\\n\\n\\n"`` token.

    tok = GgufTokenizer.from_file(path)
    ids = tok.encode("The capital of France is")
    text = tok.decode(ids)
"""

from icecache._tokenizer import GgufTokenizer

__all__ = ["GgufTokenizer"]
