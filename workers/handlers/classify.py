"""classify: label scores from a sequence classifier — softmax, or sigmoid for multi-label models.

Example job::

    {"task": "classify", "model": "tiny-sentiment", "text": ["I love it", "I hate it"], "top_k": null}
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from queueformer.contract.errors import InputTooLong
from queueformer.contract.jobs import ClassifyJob, Task
from queueformer.contract.records import ClassifyResult, LabelScore, Usage
from workers.engine.padding import pad_right, pad_token_id
from workers.handlers.base import Handler


@dataclass(frozen=True)
class ClassifyInput:
    texts: tuple[tuple[int, ...], ...]
    top_k: int | None
    function: str = "default"  # the pipeline's function_to_apply
    type_ids: tuple[tuple[int, ...], ...] | None = None  # segment ids of text pairs, for models that take them


class ClassifyHandler(Handler[ClassifyJob, ClassifyInput]):
    """Sequence classification."""

    task = Task.CLASSIFY

    @property
    def multi_label(self) -> bool:
        cfg = self.model.config
        return cfg.problem_type == "multi_label_classification" or cfg.num_labels == 1

    def preprocess(self, job: ClassifyJob) -> ClassifyInput:
        if job.text_pair is None:
            rows = tuple(tuple(self.encode(t, truncate=job.truncate, keep="left")) for t in job.texts)
            return ClassifyInput(rows, job.top_k, job.function_to_apply)
        encoded = [
            self.encode_pair(t, p or "", truncate=job.truncate) for t, p in zip(job.texts, job.pairs, strict=True)
        ]
        types = tuple(t for _, t in encoded) if all(t is not None for _, t in encoded) else None
        return ClassifyInput(tuple(ids for ids, _ in encoded), job.top_k, job.function_to_apply, types)  # type: ignore[arg-type]

    def encode_pair(self, text: str, pair: str, *, truncate: bool) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """A text pair as the tokenizer frames it ([CLS] a [SEP] b [SEP]), with its segment ids if it has them;
        too long a pair is cut from the longer text first (``longest_first``), as the pipeline would."""
        enc = self.tokenizer(text, pair, add_special_tokens=True)
        cap = self.max_input_tokens()
        if len(enc["input_ids"]) > cap:
            if not truncate:
                raise InputTooLong(
                    f"text pair is {len(enc['input_ids'])} tokens; {self.entry.name} accepts {cap} "
                    "(set truncate=true to cut it)",
                    param="text_pair",
                )
            enc = self.tokenizer(text, pair, add_special_tokens=True, truncation="longest_first", max_length=cap)
        types = enc.get("token_type_ids") if self.takes_segments else None
        return tuple(enc["input_ids"]), tuple(types) if types is not None else None

    @functools.cached_property
    def takes_segments(self) -> bool:
        """Whether the model reads segment ids (BERT does; DistilBERT and RoBERTa-style models do not use them)."""
        return "token_type_ids" in inspect.signature(self.model.forward).parameters

    def size(self, item: ClassifyInput) -> int:
        return max(len(r) for r in item.texts)

    def forward(self, batch: Sequence[ClassifyInput]) -> list[Any]:
        rows = [r for item in batch for r in item.texts]
        ids, mask = pad_right(rows, pad_token_id(self.tokenizer, self.model.config), self.device)
        kwargs: dict[str, Any] = {}
        if any(item.type_ids is not None for item in batch):
            types = [t for item in batch for t in (item.type_ids or [(0,) * len(r) for r in item.texts])]
            kwargs["token_type_ids"], _ = pad_right(types, 0, self.device)
        logits = self.model(input_ids=ids, attention_mask=mask, **kwargs).logits.float()
        out, at = [], 0
        for item in batch:
            out.append(self.scores(logits[at : at + len(item.texts)], item.function).cpu().tolist())
            at += len(item.texts)
        return out

    def scores(self, logits: torch.Tensor, function: str) -> torch.Tensor:
        """The pipeline's ``function_to_apply``; its default depends on the model's problem type."""
        if function == "default":
            if self.model.config.problem_type == "regression":
                function = "none"
            else:
                function = "sigmoid" if self.multi_label else "softmax"
        if function == "sigmoid":
            return torch.sigmoid(logits)
        if function == "softmax":
            return torch.softmax(logits, dim=-1)
        return logits

    def postprocess(self, item: ClassifyInput, raw: Any) -> ClassifyResult:
        id2label = self.model.config.id2label
        labels = []
        for scores in raw:
            ranked = sorted(
                (LabelScore(label=str(id2label.get(i, f"LABEL_{i}")), score=s) for i, s in enumerate(scores)),
                key=lambda ls: -ls.score,
            )
            labels.append(ranked[: item.top_k] if item.top_k is not None else ranked)
        tokens = sum(len(r) for r in item.texts)
        return ClassifyResult(
            model=self.entry.name, labels=labels, multi_label=self.multi_label, usage=Usage(prompt_tokens=tokens)
        )
