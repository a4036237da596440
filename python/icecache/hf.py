"""Hugging Face transformers through IceCache: an attention function and a cache.

    import icecache, icecache.hf
    icecache.hf.register()                          # attn_implementation "icecache"
    model = AutoModelForCausalLM.from_pretrained(dir, gguf_file=name,
                                                 attn_implementation="icecache")
    client = icecache.Client.attach(socket)
    cache = icecache.hf.IceCacheCache(client, model.config, max_tokens=4096, budget_tokens=256)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)

What runs where, as in the paper and the C++ model path (model/attention.h): the prompt
attends in full (PyTorch SDPA over the prompt's K/V), and its K/V of every layer go to the
daemon (``Sequence.prefill``), which builds the layer's index; each decode step hands the new
token's query, K and V to ``Sequence.decode``, which appends, selects the pages, fetches the
missed ones and attends over sink + window + selected pages (the first ``full_kv_layers``
layers over every token). The cache keeps no K/V of its own: the daemon and the client library
hold them.

Only batch size 1 is served (one sequence); a batch needs ``decode_batch`` of the client
library. Tensors go to the client in ``dtype`` (fp16 by default, what the C++ model path
keeps) without further copies; in CUDA mode on the model's device and current stream.

The model sees the cache through ``update()``, which records which layer's K/V came last on
this thread; the attention function, called right after for the same layer, takes the
sequence from there. With any other cache (or none) the attention function is SDPA, so a model
loaded with ``attn_implementation="icecache"`` also runs plain.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import icecache

try:  # the mask function of SDPA for the prompt (transformers >= 4.53)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError:  # pragma: no cover
    AttentionMaskInterface = None
    sdpa_mask = None

ATTN_IMPLEMENTATION = "icecache"

__all__ = ["ATTN_IMPLEMENTATION", "IceCacheCache", "attention_forward", "register"]

_TORCH_DTYPES = {icecache.DType.FP16: torch.float16, icecache.DType.BF16: torch.bfloat16}

# (layer, cache) of the last update() on this thread, for the attention call that follows it.
_pending = threading.local()


class _IceCacheLayer(CacheLayerMixin):
    """One decoder layer's view of the sequence: counts its tokens, keeps no K/V."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, cache: IceCacheCache, layer_idx: int) -> None:
        super().__init__()
        # A weak reference: the cache holds its layers, so a strong one back would make a
        # cycle, and a cache let go without drop() would keep its daemon sequence until the
        # garbage collector runs.
        self._cache = weakref.proxy(cache)
        self._layer_idx = layer_idx
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != 1:
            raise NotImplementedError(
                "IceCacheCache serves batch size 1 (a batch needs the client's decode_batch)"
            )
        tokens = key_states.shape[-2]
        if self.length == 0:
            self._cache._prefill(self._layer_idx, key_states, value_states)
            _pending.entry = None  # the prompt attends in full (SDPA)
        elif tokens != 1:
            raise NotImplementedError(
                "IceCacheCache decodes one token per forward after the prompt "
                f"(got {tokens} at layer {self._layer_idx})"
            )
        else:
            stale = getattr(_pending, "entry", None)
            if stale is not None and stale[1] is self._cache:
                # The previous layer's decode was not taken by the attention function: the model
                # attends with another implementation, which would see only this token's K/V
                # (the cache keeps none) and give wrong output without an error.
                _pending.entry = None
                raise RuntimeError(
                    "IceCacheCache needs the model loaded with attn_implementation="
                    f"{ATTN_IMPLEMENTATION!r} (icecache.hf.register() first): layer "
                    f"{stale[0]}'s decode step did not go through it"
                )
            _pending.entry = (self._layer_idx, self._cache)
        self.length += tokens
        # Prefill: the prompt's K/V for its full attention. Decode: the new token's K/V, which
        # the attention function hands to Sequence.decode.
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self._cache.max_tokens

    def reset(self) -> None:
        raise NotImplementedError("an IceCacheCache holds one sequence; make a new cache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("IceCacheCache does not support beam search")


class IceCacheCache(Cache):
    """A transformers Cache whose K/V live in icecached (one IceCache sequence).

    Args:
        client: an attached icecache.Client (CPU or CUDA mode; CUDA mode needs the model's
            tensors on that device).
        config: the model's config (num_hidden_layers, num_attention_heads,
            num_key_value_heads, head_dim or hidden_size).
        max_tokens: the most tokens the sequence will hold (prompt + generated).
        dtype: icecache.DType of the stored K/V (FP16 default; BF16).
        budget_tokens, page_size, sink_tokens, window_tokens, full_kv_layers, label: the
            sequence's geometry (None: the daemon's defaults; see Client.create_sequence).
        qk_layout: "as_is" hands q and k to the daemon in the model's own dimension order;
            "interleaved" reorders each head's rotate-half RoPE pairs (i, i + d/2), the layout
            of transformers' Llama, to adjacent pairs (2i, 2i + 1), the layout of GGUF files,
            llama.cpp and the project's C++ model. Attention is the same either way (dot
            products do not depend on the order); the daemon's index is not (its DCI tree
            projects keys on a fixed random direction), so "interleaved" makes a GGUF model's
            selections those of the C++ model path.
        sequence_options: further keyword arguments of Client.create_sequence (selection,
            drift_threshold where the library has them).
    """

    def __init__(
        self,
        client: icecache.Client,
        config: Any,
        max_tokens: int,
        *,
        dtype: icecache.DType = icecache.DType.FP16,
        budget_tokens: int | None = None,
        page_size: int | None = None,
        sink_tokens: int | None = None,
        window_tokens: int | None = None,
        full_kv_layers: int | None = None,
        label: str = "transformers",
        qk_layout: str = "as_is",
        **sequence_options: Any,
    ) -> None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.num_layers = int(text_config.num_hidden_layers)
        self.num_q_heads = int(text_config.num_attention_heads)
        self.num_kv_heads = int(
            getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        )
        self.head_dim = int(
            getattr(text_config, "head_dim", None)
            or text_config.hidden_size // text_config.num_attention_heads
        )
        self.max_tokens = int(max_tokens)
        self.client = client
        self.dtype = dtype
        self.torch_dtype = _TORCH_DTYPES[dtype]
        self._geometry = dict(
            page_size=page_size,
            budget_tokens=budget_tokens,
            sink_tokens=sink_tokens,
            window_tokens=window_tokens,
            full_kv_layers=full_kv_layers,
            label=label,
            **sequence_options,
        )
        if qk_layout not in ("as_is", "interleaved"):
            raise ValueError(f"qk_layout must be 'as_is' or 'interleaved', not {qk_layout!r}")
        half = torch.arange(self.head_dim // 2)
        self._qk_order = (
            torch.stack([half, half + self.head_dim // 2], -1).flatten()
            if qk_layout == "interleaved"
            else None
        )
        self.sequence: icecache.Sequence | None = None
        self._out: torch.Tensor | None = None
        super().__init__(layers=[_IceCacheLayer(self, i) for i in range(self.num_layers)])

    # -- the sequence
    def _prefill(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.sequence is None:
            self.sequence = self.client.create_sequence(
                num_layers=self.num_layers,
                num_q_heads=self.num_q_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                max_tokens=self.max_tokens,
                dtype=self.dtype,
                **self._geometry,
            )
        # [1, kv_heads, tokens, head_dim] -> token-major [tokens, kv_heads, head_dim] (one copy,
        # which also converts to the stored dtype).
        k = self._reorder(key_states[0].transpose(0, 1)).to(self.torch_dtype).contiguous()
        v = value_states[0].transpose(0, 1).to(self.torch_dtype).contiguous()
        self.sequence.prefill(layer, k, v, stream=_stream(k))

    def _decode(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        assert self.sequence is not None
        # [1, heads, 1, head_dim] -> [heads, head_dim]: views when the dtype matches.
        q = self._reorder(query[0, :, 0, :]).to(self.torch_dtype).contiguous()
        k = self._reorder(key[0, :, 0, :]).to(self.torch_dtype).contiguous()
        v = value[0, :, 0, :].to(self.torch_dtype).contiguous()
        if self._out is None or self._out.device != q.device:
            self._out = torch.empty_like(q)
        self.sequence.decode(layer, q, k, v, self._out, stream=_stream(q))
        # transformers wants [batch, q_len, heads, head_dim]
        return self._out.to(query.dtype).view(1, 1, self.num_q_heads, self.head_dim)

    def _reorder(self, t: torch.Tensor) -> torch.Tensor:
        if self._qk_order is None:
            return t
        if self._qk_order.device != t.device:
            self._qk_order = self._qk_order.to(t.device)
        return t.index_select(-1, self._qk_order)

    def drop(self) -> None:
        """Frees the sequence in the daemon now (otherwise when the cache is collected)."""
        if self.sequence is not None:
            self.sequence.drop()
            self.sequence = None

    @property
    def is_compileable(self) -> bool:
        return False


def _stream(t: torch.Tensor) -> int | None:
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return None


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as "icecache".

    A decode step of a model whose cache is an IceCacheCache goes through Sequence.decode;
    everything else (the prompt, other caches) is SDPA.
    """
    entry = getattr(_pending, "entry", None)
    _pending.entry = None
    layer = getattr(module, "layer_idx", None)
    if entry is None or entry[0] != layer:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cache: IceCacheCache = entry[1]
    if scaling is not None and not math.isclose(
        scaling, 1.0 / math.sqrt(query.shape[-1]), rel_tol=1e-6
    ):
        raise NotImplementedError("IceCache attends with the scale 1/sqrt(head_dim)")
    return cache._decode(layer, query, key, value), None


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Registers the attention function (and SDPA's mask for the prompt) under `name`."""
    AttentionInterface.register(name, attention_forward)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(name, sdpa_mask)
    return name
