"""The handler contract: ``preprocess -> forward -> postprocess``, and only ``forward`` touches the device.

``preprocess`` (tokenise, check lengths) and ``postprocess`` (decode, score, shape the result) run in
the worker's task threads; ``forward`` runs on the worker's lane (its one thread for model work,
``workers.engine.lane``) on a *batch* of prepared items from many jobs, so each handler is written
batch-first and an item's answer must not depend on what it was batched with. Adding a job type is
one handler file plus its entry in ``queueformer.contract.tasks``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel

from queueformer.contract.errors import InputTooLong
from queueformer.contract.jobs import JobBase, Task
from queueformer.contract.registry import ModelEntry
from workers.loading import Loaded

J = TypeVar("J", bound=JobBase)
P = TypeVar("P")


class Handler(ABC, Generic[J, P]):
    """One job type on one loaded model."""

    task: ClassVar[Task]
    #: "bucket": the engine groups items by length and calls ``forward`` per group;
    #: "decode": items join a continuous-batching decode loop (see workers.engine.decode).
    batching: ClassVar[Literal["bucket", "decode"]] = "bucket"

    def __init__(self, entry: ModelEntry, loaded: Loaded | None) -> None:
        self.entry = entry
        self.loaded = loaded

    @property
    def model(self) -> Any:
        assert self.loaded is not None
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        assert self.loaded is not None
        return self.loaded.tokenizer

    @property
    def device(self) -> torch.device:
        assert self.loaded is not None
        return self.loaded.device

    @abstractmethod
    def preprocess(self, job: J) -> P:
        """CPU only: turn a job into what ``forward`` consumes; raise ``InvalidInput`` subclasses on bad input."""

    @abstractmethod
    def forward(self, batch: Sequence[P]) -> list[Any]:
        """Device work for a batch of prepared items, one raw output per item (called under inference_mode)."""

    @abstractmethod
    def postprocess(self, item: P, raw: Any) -> BaseModel:
        """CPU only: the job's result from its raw output."""

    def size(self, item: P) -> int:
        """Tokens the item costs; the engine sorts and buckets by it."""
        return 1

    def group_key(self, item: P) -> Hashable:
        """Items with different keys never share a forward (e.g. different beam counts)."""
        return None

    def run(self, jobs: Sequence[J]) -> list[BaseModel]:
        """Run jobs in this thread, as one batch, without an engine (reference path for tools and tests)."""
        items = [self.preprocess(j) for j in jobs]
        with torch.inference_mode():
            raws = self.forward(items)
        return [self.postprocess(i, r) for i, r in zip(items, raws, strict=True)]

    # --- shared input handling -----------------------------------------------------------------

    def max_input_tokens(self) -> int:
        """The longest input this model accepts: the registry's cap, else the tokenizer's or config's."""
        limits = [self.entry.max_input_tokens] if self.entry.max_input_tokens else []
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
            limits.append(tok_max)
        cfg = self.model.config
        for attr in ("max_position_embeddings", "n_positions"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                limits.append(value)
                break
        return min(limits) if limits else 1_000_000

    def encode(
        self, text: str, *, truncate: bool, reserve: int = 0, keep: Literal["left", "right"] = "right"
    ) -> list[int]:
        """Token ids of ``text`` (with the tokenizer's special tokens), checked against the model's limit.

        ``reserve`` tokens are kept free (new tokens of a decoder); ``keep`` says which end survives
        truncation (a prompt keeps its end, a document its start).
        """
        ids: list[int] = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        cap = self.max_input_tokens() - reserve
        if cap < 1:
            raise InputTooLong(
                f"max_new_tokens leaves no room for input: the model takes {self.max_input_tokens()} tokens in all",
                param="max_new_tokens",
            )
        if len(ids) > cap:
            if not truncate:
                raise InputTooLong(
                    f"input is {len(ids)} tokens; {self.entry.name} accepts {cap} here (set truncate=true to cut it)",
                    param="text",
                )
            ids = ids[-cap:] if keep == "right" else ids[:cap]
        return ids
