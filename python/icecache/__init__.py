"""IceCache for Python: the client library of icecached, tensors through DLPack.

    import icecache
    client = icecache.Client.attach("/run/icecache/icecached.sock")
    seq = client.create_sequence(num_layers=32, num_q_heads=32, num_kv_heads=8, head_dim=128,
                                 max_tokens=131072, dtype=icecache.DType.BF16,
                                 budget_tokens=256)
    seq.prefill(layer, k, v)                 # [tokens, kv_heads, head_dim] each
    seq.decode(layer, q, k_new, v_new, out)  # out written in place
    client.decode_batch(layer, [seq, ...], q, k_new, v_new, out)  # where HAS_DECODE_BATCH

Tensors are numpy arrays or PyTorch tensors (anything with __dlpack__), C-contiguous, of the
sequence's dtype (float16 / bfloat16, or their bits as uint16); host memory in CPU mode, the
client's CUDA device in CUDA mode (then pass `stream=`). Nothing is copied. A failed call
raises the exception of its status code (icecache.errors), with `.code` and `.message`.

Submodules: icecache.hf (Hugging Face transformers: an attention function and a cache),
icecache.operator (the daemon's gRPC control API: stats, sequences, config),
icecache.tokenizer (the C++ tokenizer of a GGUF model, the reference for token ids).
"""

from icecache._core import (
    HAS_DECODE_BATCH,
    HAS_SELECTION_MODE,
    Client,
    ClientCounters,
    DecodeBreakdown,
    DType,
    ExecutionMode,
    Geometry,
    Sequence,
)
from icecache.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    IceCacheError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    StatusCode,
    UnauthenticatedError,
    UnavailableError,
    error_from_status,
)

if HAS_SELECTION_MODE:
    from icecache._core import SelectionMode  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "Client",
    "ClientCounters",
    "DecodeBreakdown",
    "DType",
    "DeadlineExceededError",
    "ExecutionMode",
    "FailedPreconditionError",
    "Geometry",
    "HAS_DECODE_BATCH",
    "HAS_SELECTION_MODE",
    "IceCacheError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "Sequence",
    "StatusCode",
    "UnauthenticatedError",
    "UnavailableError",
    "error_from_status",
]
