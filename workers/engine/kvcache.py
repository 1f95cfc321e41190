"""A KV cache for the continuous-batching loop: preallocated slabs instead of a concatenation per step.

transformers' ``DynamicCache`` appends a token by ``torch.cat`` of the whole cache, so each decode step
copies every key and value of the batch: at 64 rows x 128 tokens that copy was 41% of a GPT-2-small
step on CPU. Here each layer owns a buffer ``[rows, heads, capacity, head_dim]``; a step writes one
column in place and attention reads a view of the filled span. Capacity grows by doubling (amortised
O(1) per token). Rows leave with ``select_rows``, leading all-padding columns are dropped by moving a
start offset (no copy), and batches are combined with ``merged`` (one copy per admission round). A
packed prefill (many prompts as one sequence) leaves one row of segments; ``unpacked`` lays them out
as left-padded rows.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

_MIN_HEADROOM = 64


class SlabLayer(DynamicLayer):
    """One layer's keys and values in a growable slab; ``keys``/``values`` are views of the filled span.

    The slab keeps the model's own dtype: attention then computes exactly what ``model.generate`` does.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.start = 0
        self.end = 0
        super().__init__(**kwargs)

    # DynamicLayer's code reads and assigns ``keys``/``values``; route them to the slab.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, self.start : self.end]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k = value
        self.start, self.end = 0, 0 if value is None else value.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, self.start : self.end]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = value

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _reserve(self, n: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        """Make room for ``n`` more columns, compacting to the left and doubling when needed."""
        length = self.end - self.start
        if self._k is not None and self.end + n <= self._k.shape[2]:
            return
        cap = max(2 * (length + n), length + n + _MIN_HEADROOM)
        b, h, _, d = like_k.shape
        k = like_k.new_empty((b, h, cap, d))
        v = like_v.new_empty((b, h, cap, like_v.shape[-1]))
        if self._k is not None and self._v is not None and length:
            k[:, :, :length] = self._k[:, :, self.start : self.end]
            v[:, :, :length] = self._v[:, :, self.start : self.end]
        self._k, self._v, self.start, self.end = k, v, 0, length

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first = self.end == self.start
        n = key_states.shape[-2]
        self._reserve(n, key_states, value_states)
        assert self._k is not None and self._v is not None
        self._k[:, :, self.end : self.end + n] = key_states
        self._v[:, :, self.end : self.end + n] = value_states
        self.end += n
        if first:
            # A prefill attends only to what it just wrote: hand back those contiguous tensors, as
            # DynamicCache does, rather than a strided view of the slab.
            return key_states, value_states
        return self._k[:, :, self.start : self.end], self._v[:, :, self.start : self.end]

    def get_seq_length(self) -> int:
        return self.end - self.start

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices``: only the filled span is copied, into a slab with the same room after it.

        Copying the whole slab (free columns included) made a compaction of a long-tail batch six
        times the copy of its filled span.
        """
        if self._k is None or self._v is None:
            return
        length = self.end - self.start
        room = self._k.shape[2] - self.start
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty((indices.shape[0], old.shape[1], room, old.shape[3]))
            torch.index_select(old[:, :, self.start : self.end], 0, indices, out=new[:, :, :length])
            setattr(self, name, new)
        self.start, self.end = 0, length

    def trim_left(self, n: int) -> None:
        self.start += n

    def fill_holes(self, holes: torch.Tensor, movers: torch.Tensor, rows: int) -> None:
        """Keep the first ``rows`` rows, rows ``movers`` copied into rows ``holes`` first (in place).

        Only the moved rows are copied: a compaction that copied every kept row cost as much as a
        decode step; this one costs a few rows, so finished rows leave the batch at once.
        The slab keeps its allocation (the rows after ``rows`` stay unused until it is next replaced).
        """
        for name in ("_k", "_v"):
            slab = getattr(self, name)
            if slab is None:
                continue
            if holes.numel():
                span = slab[:, :, self.start : self.end]
                with torch.inference_mode():  # the slab was written by forwards under inference mode
                    span.index_copy_(0, holes, span.index_select(0, movers))
            setattr(self, name, slab[:rows])

    def unpacked(self, bounds: list[tuple[int, int]], headroom: int) -> SlabLayer:
        """The segments ``[a, b)`` of this one-row layer as rows, right-aligned on the longest."""
        k, v = self.keys, self.values
        assert k is not None and v is not None and k.shape[0] == 1
        width = max(b - a for a, b in bounds)
        out = SlabLayer()
        out.lazy_initialization(k, v)
        out._k = k.new_empty((len(bounds), k.shape[1], width + headroom, k.shape[3]))
        out._v = v.new_empty((len(bounds), v.shape[1], width + headroom, v.shape[3]))
        for slab, packed in ((out._k, k), (out._v, v)):
            for row, (a, b) in enumerate(bounds):
                slab[row, :, width - (b - a) : width] = packed[0, :, a:b]
                slab[row, :, : width - (b - a)] = 0.0  # read (masked) by attention: zeros, never garbage
        out.start, out.end = 0, width
        return out

    @staticmethod
    def merged(
        layers: list[SlabLayer],
        headroom: int,
        dest: list[torch.Tensor] | None = None,
    ) -> SlabLayer:
        """The rows of every layer stacked, right-aligned on the longest (the rest left-padded).

        ``dest`` places each layer's rows at those rows of the result instead of in order.
        """
        keys = [(x.keys, x.values) for x in layers]
        width = max(k.shape[2] for k, _ in keys if k is not None)
        rows = sum(k.shape[0] for k, _ in keys if k is not None)
        k0, v0 = keys[0]
        assert k0 is not None and v0 is not None
        out = SlabLayer()
        out.lazy_initialization(k0, v0)
        # Columns after ``width`` are written before anything reads them; a part's left padding is
        # read (masked) by attention and must be zeros, as NaN garbage would survive 0 * NaN there.
        out._k = k0.new_empty((rows, k0.shape[1], width + headroom, k0.shape[3]))
        out._v = v0.new_empty((rows, v0.shape[1], width + headroom, v0.shape[3]))
        at = 0
        for i, (k, v) in enumerate(keys):
            assert k is not None and v is not None
            n, length = k.shape[0], k.shape[2]
            for slab, part in ((out._k, k), (out._v, v)):
                if dest is not None:
                    slab[:, :, width - length : width].index_copy_(0, dest[i], part)
                    if length < width:
                        slab[:, :, : width - length].index_fill_(0, dest[i], 0.0)
                else:
                    slab[at : at + n, :, width - length : width] = part
                    slab[at : at + n, :, : width - length] = 0.0
            at += n
        out.start, out.end = 0, width
        return out


def plain_attention(config: Any) -> bool:
    """True when every layer attends to the full past (no sliding window, no hybrid layer types)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None):
        return False
    types = getattr(text, "layer_types", None)
    return not types or all(t == "full_attention" for t in types)


def cache_argument(model: Any) -> str:
    """The keyword the model's forward takes a KV cache by.

    transformers renamed ``past_key_values`` to ``cache`` (the old name is deprecated and goes in 5.40,
    inside the versions this project allows); a model whose forward predates the rename keeps the old one.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The KV cache a forward handed back, under either name (see ``cache_argument``)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


class SlabCache(DynamicCache):
    """A ``DynamicCache`` whose layers are ``SlabLayer``s.

    The layers exist up front: an empty Cache has length 0, is falsy, and model code that writes
    ``past_key_values or DynamicCache(...)`` would silently swap it out.
    """

    def __init__(self, num_layers: int) -> None:
        Cache.__init__(self, layers=[SlabLayer() for _ in range(num_layers)])

    @property
    def slabs(self) -> list[SlabLayer]:
        return [layer for layer in self.layers if isinstance(layer, SlabLayer)]

    def trim_left(self, n: int) -> None:
        for layer in self.slabs:
            layer.trim_left(n)

    def fill_holes(self, holes: torch.Tensor, movers: torch.Tensor, rows: int) -> None:
        for layer in self.slabs:
            layer.fill_holes(holes, movers, rows)

    @classmethod
    def merged(
        cls,
        caches: list[SlabCache],
        headroom: int = _MIN_HEADROOM,
        dest: list[torch.Tensor] | None = None,
    ) -> SlabCache:
        """One cache holding the rows of ``caches`` (see ``SlabLayer.merged``), with ``headroom`` free columns."""
        out = cls(0)
        out.layers = [
            SlabLayer.merged(list(per_layer), headroom, dest)
            for per_layer in zip(*(c.slabs for c in caches), strict=True)
        ]
        return out

    def unpacked(self, bounds: list[tuple[int, int]], headroom: int = _MIN_HEADROOM) -> SlabCache:
        """The rows of a packed prefill (segments ``[a, b)`` of one row), left-padded to the longest."""
        out = SlabCache(0)
        out.layers = [layer.unpacked(bounds, headroom) for layer in self.slabs]
        return out


def num_layers(config: Any) -> int:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "decoder_layers"):
        value = getattr(text, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell how many layers {type(config).__name__} has")
