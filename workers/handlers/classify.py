"""classify: label scores from a sequence classifier — softmax, or sigmoid for multi-label models.

Example job::

    {"task": "classify", "model": "tiny-sentiment", "text": ["I love it", "I hate it"], "top_k": null}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from queueformer.contract.jobs import ClassifyJob, Task
from queueformer.contract.records import ClassifyResult, LabelScore, Usage
from workers.engine.padding import pad_right, pad_token_id
from workers.handlers.base import Handler


@dataclass(frozen=True)
class ClassifyInput:
    texts: tuple[tuple[int, ...], ...]
    top_k: int | None


class ClassifyHandler(Handler[ClassifyJob, ClassifyInput]):
    """Sequence classification."""

    task = Task.CLASSIFY

    @property
    def multi_label(self) -> bool:
        cfg = self.model.config
        return cfg.problem_type == "multi_label_classification" or cfg.num_labels == 1

    def preprocess(self, job: ClassifyJob) -> ClassifyInput:
        rows = tuple(tuple(self.encode(t, truncate=job.truncate, keep="left")) for t in job.texts)
        return ClassifyInput(rows, job.top_k)

    def size(self, item: ClassifyInput) -> int:
        return max(len(r) for r in item.texts)

    def forward(self, batch: Sequence[ClassifyInput]) -> list[Any]:
        rows = [r for item in batch for r in item.texts]
        ids, mask = pad_right(rows, pad_token_id(self.tokenizer, self.model.config), self.device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        if self.model.config.problem_type == "regression":
            scores = logits
        elif self.multi_label:
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, dim=-1)
        flat = scores.cpu().tolist()
        out, at = [], 0
        for item in batch:
            out.append(flat[at : at + len(item.texts)])
            at += len(item.texts)
        return out

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
