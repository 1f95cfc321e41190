"""The engine's decode step with static shapes, replayed as a CUDA graph on a GPU.

At small batches an eager decode step on a GPU is mostly Python launching kernels: the weights stream
in a few milliseconds, the launches of a 22-layer model take longer. A CUDA graph records the launches
once and replays them with one call, but only over fixed tensors of fixed shapes. So here:

* the running batch's keys and values live in an *arena* per layer, ``[rows, kv heads, columns, head
  dim]``, allocated once and grown only by doubling. After a join or a row removal replaced the
  engine's slabs, they are copied in once; from then on the ``SlabCache`` layers are views of the arena,
  so each step writes its column in place and the engine's own cache operations (trimming, prefix
  copies, row selection) keep working on them unchanged;
* each step runs on a *bucket*: rows rounded up to a power of two (the extra rows decode padding that
  attends to its own column only) and columns rounded up to a power of two; the inputs are copied into
  static tensors and attention reads the bucket's columns under a prepared 4-D mask;
* on CUDA each bucket is captured once as a CUDA graph and replayed; elsewhere the same function runs
  directly (its "eager form", which the CPU tests hold to the engine's eager step token for token).

Models the graph cannot hold are decoded by the engine's eager step instead (``unsupported`` says why).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from workers.engine.device import is_oom
from workers.engine.kvcache import SlabCache, SlabLayer, cache_argument

log = logging.getLogger(__name__)

MIN_COLUMNS = 64  # the smallest column bucket: fewer graphs for short sequences, little extra reading


def bucket(n: int, least: int = 1) -> int:
    """The power of two at or above ``n`` (and at least ``least``)."""
    return max(least, 1 << max(0, n - 1).bit_length())


def unsupported(model: Any, graphs: bool) -> str | None:
    """Why the static step cannot decode ``model`` (None: it can)."""
    module = sys.modules.get(type(model).__module__)
    if module is None or not hasattr(module, "create_causal_mask"):
        # Such models build attention inputs from the 2-D mask themselves (ALiBi biases, for one), so a
        # prepared 4-D mask would not reach their attention as it is.
        return "its attention masks are not built by transformers.masking_utils"
    devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    if len(devices) > 1 or (graphs and devices & {"cpu", "disk"}):
        return "it is spread over several devices or offloaded (its hooks move tensors at every call)"
    quant = getattr(model.config, "quantization_config", None)
    if graphs and quant is not None and _int8_threshold(quant) > 0:
        # LLM.int8 splits out outlier columns by value at every call: shapes that depend on the data,
        # found with a host synchronisation, which a CUDA graph cannot record.
        return "bitsandbytes int8 with outlier splitting cannot be captured in a CUDA graph"
    return None


def _int8_threshold(quant: Any) -> float:
    get = quant.get if isinstance(quant, dict) else lambda k, d=None: getattr(quant, k, d)
    return float(get("llm_int8_threshold", 6.0) or 0) if get("load_in_8bit", False) else 0.0


class _ArenaLayer(CacheLayerMixin):
    """One layer of a bucket: writes the step's keys and values at column ``col``, attends to all columns."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, col: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.col = k, v, col
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        # a tensor index, not a Python int: the graph replays with whatever column ``col`` holds
        self.keys.index_copy_(2, self.col, key_states)
        self.values.index_copy_(2, self.col, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        assert self.keys is not None
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return 0  # positions are always given; the mask says which columns hold tokens

    def get_max_length(self) -> int:
        assert self.keys is not None
        return int(self.keys.shape[2])


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # the graph's output, overwritten at every replay


class StaticStep:
    """Decode steps of one engine's running batch on static shapes; CUDA graphs when ``graphs``."""

    def __init__(self, model: Any, *, pad_id: int, graphs: bool, name: str) -> None:
        self.model = model
        self._cache_arg = cache_argument(model)
        self.pad_id = pad_id
        self.graphs = graphs
        self.name = name
        self.device = model.get_input_embeddings().weight.device
        self.rows = 0
        self.columns = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._ids = self._pos = self._mask = self._col = torch.empty(0)
        self._captured: dict[tuple[int, int], _Captured] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if graphs else None
        self.failed: str | None = None  # set once a capture failed: the engine's eager step takes over
        self.steps = 0  # steps run here (not by the engine's eager step)
        self.loads = 0  # copies of the engine's slabs into the arena (after joins and row removals)
        self.captures = 0  # graphs recorded (once per bucket, again after the arena grows)

    @classmethod
    def build(cls, model: Any, mode: str, *, pad_id: int, name: str) -> StaticStep | None:
        """The static step ``mode`` asks for (see ``ModelEntry.static_decode``), or None for the eager step."""
        device = model.get_input_embeddings().weight.device
        graphs = device.type == "cuda" and mode != "eager"
        if mode == "off" or (mode == "auto" and not graphs):
            return None
        reason = unsupported(model, graphs=graphs)
        if reason is not None:
            log.warning("%s: decoding with the eager step, not the static one: %s", name, reason)
            return None
        return cls(model, pad_id=pad_id, graphs=graphs, name=name)

    # --- the step ---------------------------------------------------------------------------------

    def __call__(
        self, cache: SlabCache, mask: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor | None:
        """The last-position logits ``[rows, vocab]`` of one step of the running batch.

        ``mask`` is the batch's ``[rows, columns]`` mask before this step; ``cache`` advances by one column.
        None when the step must run eagerly (a capture failed); the cache is then as it was.
        """
        if self.failed is not None:
            return None
        layers = cache.slabs
        n, width = mask.shape
        with torch.inference_mode():
            if not self._bound(layers, n):
                self._load(layers, n)
            start, end = layers[0].start, layers[0].end
            assert end - start == width, "the engine's mask and its cache disagree on the batch's width"
            rows, columns = bucket(n), min(self.columns, bucket(end + 1, MIN_COLUMNS))
            self._ids[:n, 0].copy_(ids)
            self._pos[:n, 0].copy_(pos)
            if rows > n:
                self._ids[n:rows].fill_(self.pad_id)
                self._pos[n:rows].zero_()
            m = self._mask[:rows, 0, 0, :columns]
            m.zero_()
            m[:n, start:end].copy_(mask)
            m[:, end] = True  # every row attends to the column it writes (padding rows to that one only)
            self._col.fill_(end)
            logits = self._run(rows, columns)
            if logits is None:
                return None
        for layer in layers:
            layer.end += 1
        self.steps += 1
        return logits[:n, -1]

    def _run(self, rows: int, columns: int) -> torch.Tensor | None:
        if not self.graphs:
            return self._forward(rows, columns)
        captured = self._captured.get((rows, columns)) or self._capture(rows, columns)
        if captured is None:
            return None
        captured.graph.replay()
        return captured.logits.clone()  # the next replay overwrites the graph's own output

    def _forward(self, rows: int, columns: int) -> torch.Tensor:
        col = self._col
        cache = Cache(layers=[_ArenaLayer(k[:rows, :, :columns], v[:rows, :, :columns], col) for k, v in self._arena()])
        out = self.model(
            input_ids=self._ids[:rows],
            position_ids=self._pos[:rows],
            attention_mask=self._mask[:rows, :, :, :columns],
            **{self._cache_arg: cache},
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits

    def _capture(self, rows: int, columns: int) -> _Captured | None:
        current = torch.cuda.current_stream(self.device)
        try:
            # one eager run first, on a side stream: lazy initialisations and kernel choices stay out of
            # the capture (it writes the step's own column, which the replay writes again)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self._forward(rows, columns)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other engines' threads in this process may use the device during the capture
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self._forward(rows, columns)
        except Exception as exc:
            if is_oom(exc):
                raise
            self.failed = f"{type(exc).__name__}: {exc}"
            log.warning("%s: CUDA graph capture failed, decoding with the eager step: %s", self.name, self.failed)
            return None
        captured = _Captured(graph, logits)
        self._captured[(rows, columns)] = captured
        self.captures += 1
        return captured

    # --- the arena --------------------------------------------------------------------------------

    def _arena(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self._keys, self._values, strict=True))

    def _bound(self, layers: list[SlabLayer], n: int) -> bool:
        """Whether the slabs are still views of the arena (rows, then columns to write into)."""
        if not self._keys or not layers or layers[0]._k is None:
            return False
        first = layers[0]
        assert first._k is not None
        return (
            first._k.data_ptr() == self._keys[0].data_ptr() and first._k.shape[0] == n and first.end + 1 <= self.columns
        )

    def _load(self, layers: list[SlabLayer], n: int) -> None:
        """Copy the slabs into the arena (growing it if needed) and make them views of it, from column 0."""
        self.loads += 1
        spans = [(layer.keys, layer.values) for layer in layers]
        width = layers[0].end - layers[0].start
        rows, columns = max(self.rows, bucket(n)), max(self.columns, bucket(2 * (width + 1), MIN_COLUMNS))
        if rows > self.rows or columns > self.columns:
            self._allocate(layers, rows, columns)  # the spans' views keep the old arena alive while copied
        elif self._keys and _shares(layers[0]._k, self._keys[0]):
            # moving the filled span back to column 0 of the same arena: the two ranges may overlap
            spans = [(k.clone(), v.clone()) for k, v in spans if k is not None and v is not None]
        for layer, (k, v), (ak, av) in zip(layers, spans, self._arena(), strict=True):
            assert k is not None and v is not None
            ak[:n, :, :width] = k
            av[:n, :, :width] = v
            layer._k, layer._v, layer.start, layer.end = ak[:n], av[:n], 0, width

    def _allocate(self, layers: list[SlabLayer], rows: int, columns: int) -> None:
        """A new arena (shaped like each layer's slab) and static inputs; graphs of the old ones are dropped."""
        self._captured.clear()
        self._keys, self._values = [], []
        for layer in layers:
            k, v = layer._k, layer._v
            assert k is not None and v is not None
            # zeros, not empty: columns outside the mask must not hold NaN garbage (0 * NaN in attention)
            self._keys.append(k.new_zeros((rows, k.shape[1], columns, k.shape[3])))
            self._values.append(v.new_zeros((rows, v.shape[1], columns, v.shape[3])))
        self._ids = torch.zeros((rows, 1), dtype=torch.long, device=self.device)
        self._pos = torch.zeros((rows, 1), dtype=torch.long, device=self.device)
        self._mask = torch.zeros((rows, 1, 1, columns), dtype=torch.bool, device=self.device)
        self._col = torch.zeros(1, dtype=torch.long, device=self.device)
        self.rows, self.columns = rows, columns
        log.info("%s: static decode arena of %d rows x %d columns", self.name, rows, columns)

    def release(self) -> None:
        """Drop the arena and every graph (after an out-of-memory error); the next step builds them again."""
        self._captured.clear()
        self._keys, self._values = [], []
        self.rows = self.columns = 0


def _shares(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
