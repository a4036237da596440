#!/usr/bin/env python3
"""Writes the seed corpora of the libFuzzer targets (tests/fuzz/corpus/<target>/).

The seeds are committed; rerun this after changing it:  python3 tests/fuzz/make_seeds.py
Each target starts from a few well-formed inputs (and some near misses) so that a short CI
run reaches the interesting code at once instead of spending its seconds finding the format.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- GGUF (fuzz_gguf) -------------------------------------------------------------------------
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gval(t, v):
    fmt = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
           U64: "Q", I64: "q", F64: "d"}
    if t == STR:
        return gstr(v)
    if t == ARR:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(gval(et, x) for x in items)
    return struct.pack("<" + fmt[t], v)


def gguf(kvs, tensors, alignment=32, version=3):
    """kvs: [(key, type, value)]; tensors: [(name, dims, ggml_type, data bytes)]."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for k, t, v in kvs:
        out += gstr(k) + struct.pack("<I", t) + gval(t, v)
    offset = 0
    infos, blobs = b"", b""
    for name, dims, gt, data in tensors:
        infos += gstr(name) + struct.pack("<I", len(dims)) + b"".join(
            struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", gt, offset)
        pad = (-len(data)) % alignment
        blobs += data + b"\0" * pad
        offset += len(data) + pad
    out += infos
    out += b"\0" * ((-len(out)) % alignment)
    return out + blobs


def byte_token(b):
    ok = lambda x: 33 <= x <= 126 or 161 <= x <= 172 or 174 <= x <= 255
    if ok(b):
        return chr(b)
    return chr(256 + sum(1 for x in range(b) if not ok(x)))


tokens = [byte_token(b) for b in range(256)] + ["he", "the", byte_token(32) + "t", "<|im_start|>",
                                                 "<|im_end|>", "<|endoftext|>"]
types = [1] * (len(tokens) - 3) + [3, 3, 3]
merges = ["h e", "t he", byte_token(32) + " t"]
tok_kvs = [
    ("general.architecture", STR, "llama"),
    ("general.alignment", U32, 32),
    ("tokenizer.ggml.model", STR, "gpt2"),
    ("tokenizer.ggml.pre", STR, "smollm"),
    ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
    ("tokenizer.ggml.token_type", ARR, (I32, types)),
    ("tokenizer.ggml.merges", ARR, (STR, merges)),
    ("tokenizer.ggml.bos_token_id", U32, len(tokens) - 3),
    ("tokenizer.ggml.eos_token_id", U32, len(tokens) - 1),
]
f32 = struct.pack("<8f", *[0.5 * i for i in range(8)])
f16 = struct.pack("<8e", *[0.25 * i for i in range(8)])
q8_0 = struct.pack("<e", 0.5) + bytes(range(32))  # one Q8_0 block: scale + 32 int8
write("fuzz_gguf", "tokenizer_and_tensors.gguf",
      gguf(tok_kvs, [("w.f32", [8], 0, f32), ("w.f16", [2, 4], 1, f16), ("w.q8", [32], 8, q8_0)]))
write("fuzz_gguf", "scalars.gguf", gguf([
    ("a.u8", U8, 7), ("a.i8", I8, -7), ("a.u16", U16, 700), ("a.i16", I16, -700),
    ("a.u32", U32, 70000), ("a.i32", I32, -70000), ("a.f32", F32, 1.5), ("a.bool", BOOL, True),
    ("a.u64", U64, 1 << 40), ("a.i64", I64, -(1 << 40)), ("a.f64", F64, 2.25),
    ("a.ints", ARR, (I64, [1, -2, 3])), ("a.floats", ARR, (F32, [0.5, -1.0])),
    ("a.nested", ARR, (ARR, [(U8, [1, 2]), (U8, [])])),
], []))
write("fuzz_gguf", "empty_v2.gguf", gguf([], [], version=2))
write("fuzz_gguf", "align64.gguf",
      gguf([("general.alignment", U32, 64)], [("t", [8], 0, f32)], alignment=64))

# ---- tokenizer (fuzz_tokenizer): first byte even = encode the rest with the fixed vocabulary ----
for i, text in enumerate([b"Hello, world! 123", b"the then other thing  \n\t ",
                          "caf\u00e9 \u65e5\u672c \U0001F600".encode(), b"<|im_start|>user\nhi<|im_end|>",
                          b"\xff\xfe\x80 broken utf8 \xc3", b"don't won't I'm 12345678"]):
    write("fuzz_tokenizer", f"text{i}", bytes([0]) + text)
write("fuzz_tokenizer", "special", bytes([2]) + b"<|im_start|>a<|endoftext|>b")
# odd: a fuzzed vocabulary (FuzzedDataProvider format); a plausible one and an empty one.
write("fuzz_tokenizer", "vocab_default", bytes([1]) + b"\x01" * 8 + b"abc hello")
write("fuzz_tokenizer", "vocab_empty", bytes([1]) + b"\x00" * 16)

# ---- FuzzedDataProvider targets (fuzz_ring, fuzz_attach, fuzz_control, fuzz_index) ------------
# Their inputs are consumed as random choices; a few varied byte patterns give libFuzzer a start.
for target in ("fuzz_ring", "fuzz_index"):
    write(target, "zeros", b"\0" * 64)
    write(target, "ones", b"\xff" * 64)
    write(target, "counting", bytes(range(256)))
    write(target, "mixed", bytes((i * 37 + 11) % 256 for i in range(512)))

# fuzz_attach: what a client writes on a fresh attach connection (then it half-closes): the
# attach request (proto/icecache/v1/abi.h), or garbage, or nothing.
write("fuzz_attach", "empty", b"")
write("fuzz_attach", "short", b"ICEA")
write("fuzz_attach", "zeros", b"\0" * 64)
write("fuzz_attach", "counting", bytes(range(128)))
MAGIC, ABI = 0x314E455241434349, 2  # kArenaMagic ("ICCAREN1"), kAbiVersion
write("fuzz_attach", "client", struct.pack("<QIIQQ", MAGIC, ABI, 0, 0, 0))
write("fuzz_attach", "operator", struct.pack("<QIIQQ", MAGIC, ABI, 1, 0, 0))
# A recovery attach (kAttachRecover) announcing segments it does not send: refused.
write("fuzz_attach", "recover_without_fds", struct.pack("<QIIQQ", MAGIC, ABI, 2, 3, 0))
write("fuzz_attach", "bad_version", struct.pack("<QIIQQ", MAGIC, ABI + 1, 0, 0, 0))
write("fuzz_attach", "bad_flags", struct.pack("<QIIQQ", MAGIC, ABI, 0xFFFFFFFF, 1, 2))
write("fuzz_attach", "twice", struct.pack("<QIIQQ", MAGIC, ABI, 0, 0, 0) * 2)

# fuzz_control: first byte = method, second = identity, rest = the request body (protobuf).
for m in range(7):
    for who in range(4):
        write("fuzz_control", f"m{m}_id{who}", bytes([m, who]))
# CreateSequenceRequest{geometry{2 layers, 4 q heads, 2 kv heads, head_dim 64, fp16, 128
# tokens}, label "seed"}, with and without the optional fields (page_size, budget, sink).
geometry = bytes.fromhex("08021004180220402802308001")
write("fuzz_control", "create_body", bytes([0, 0]) + b"\x0a" + bytes([len(geometry)]) + geometry +
      b"\x12\x04seed")
full = geometry + bytes.fromhex("3810408001" "4804")
write("fuzz_control", "create_full", bytes([0, 0]) + b"\x0a" + bytes([len(full)]) + full)
write("fuzz_control", "create_as_operator", bytes([0, 1]) + b"\x0a" + bytes([len(geometry)]) +
      geometry)
write("fuzz_control", "list_page", bytes([2, 0]) + b"\x08\x02")
write("fuzz_control", "bad_body", bytes([0, 0]) + b"\xff\xff\xff\xff\x0f")
write("fuzz_control", "handle_body", bytes([1, 0]) + b"\x0a\x10" + b"0123456789abcdef")
write("fuzz_control", "drop_body", bytes([3, 0]) + b"\x0a\x10" + b"0123456789abcdef")
# RestoreSequenceRequest{geometry, previous_handle "seq_0..0", layers [{layer 1, prefill 0..64,
# appends [{first 64, tokens 16, count 2}]}], last}.
handle = b"seq_" + b"0" * 32
history = b"\x08\x01\x10\x00\x18\x40" + b"\x22\x06" + b"\x08\x40\x10\x10\x18\x02"
write("fuzz_control", "restore_body", bytes([6, 0]) + b"\x0a" + bytes([len(geometry)]) + geometry +
      b"\x1a" + bytes([len(handle)]) + handle + b"\x22" + bytes([len(history)]) + history +
      b"\x28\x01")
