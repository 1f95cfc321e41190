"""embed: one vector per input, pooled from the last hidden state of an encoder or decoder model.

Inputs are padded on the right and pooled over their own tokens only (the attention mask), so a vector
does not depend on what it was batched with. ``mean`` averages the tokens, ``cls`` takes the first,
``last`` the last real token (the usual choice for decoder models); ``dimensions`` keeps the first N
dimensions before normalising (Matryoshka-style truncation, as OpenAI's ``dimensions`` does).

Example job::

    {"task": "embed", "model": "tiny-bert-embed", "input": ["the cat sleeps", "a dog runs"]}
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from queueformer.contract.errors import InputTooLong, InvalidInput
from queueformer.contract.jobs import EmbedJob, Task
from queueformer.contract.records import EmbedResult, Usage
from workers.engine.padding import pad_right, pad_token_id
from workers.handlers.base import Handler


@dataclass(frozen=True)
class EmbedInput:
    rows: tuple[tuple[int, ...], ...]
    pooling: str
    normalize: bool
    dimensions: int | None
    encoding_format: str


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """``[rows, width, dim]`` hidden states of right-padded rows -> ``[rows, dim]``."""
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        last = mask.sum(-1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


class EmbedHandler(Handler[EmbedJob, EmbedInput]):
    """Feature extraction with pooling."""

    task = Task.EMBED

    def preprocess(self, job: EmbedJob) -> EmbedInput:
        width = int(getattr(self.model.config, "hidden_size", 0) or self.model.get_input_embeddings().embedding_dim)
        if job.dimensions is not None and job.dimensions > width:
            raise InvalidInput(f"dimensions is {job.dimensions}; {self.entry.name} has {width}", param="dimensions")
        vocab = self.model.get_input_embeddings().num_embeddings
        rows = []
        for value in job.inputs:
            if isinstance(value, str):
                rows.append(tuple(self.encode(value, truncate=job.truncate, keep="left")))
                continue
            if max(value) >= vocab:
                raise InvalidInput(f"token id {max(value)} is outside {self.entry.name}'s vocabulary", param="input")
            cap = self.max_input_tokens()
            if len(value) > cap and not job.truncate:
                raise InputTooLong(f"input is {len(value)} tokens; {self.entry.name} accepts {cap}", param="input")
            rows.append(tuple(value[:cap]))
        return EmbedInput(tuple(rows), job.pooling, job.normalize, job.dimensions, job.encoding_format)

    def size(self, item: EmbedInput) -> int:
        return max(len(r) for r in item.rows)

    def group_key(self, item: EmbedInput) -> Hashable:
        return item.pooling  # one pooling per forward keeps the batch a single tensor op

    def forward(self, batch: Sequence[EmbedInput]) -> list[Any]:
        rows = [r for item in batch for r in item.rows]
        ids, mask = pad_right(rows, pad_token_id(self.tokenizer, self.model.config), self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        vectors = pool(hidden, mask, batch[0].pooling).cpu()
        out, at = [], 0
        for item in batch:
            out.append(vectors[at : at + len(item.rows)])
            at += len(item.rows)
        return out

    def postprocess(self, item: EmbedInput, raw: Any) -> EmbedResult:
        vectors: torch.Tensor = raw
        if item.dimensions is not None:
            vectors = vectors[:, : item.dimensions]
        if item.normalize:
            vectors = F.normalize(vectors, dim=-1)
        return EmbedResult(
            model=self.entry.name,
            embeddings=vectors.tolist(),
            pooling=item.pooling,
            normalized=item.normalize,
            encoding_format=item.encoding_format,
            usage=Usage(prompt_tokens=sum(len(r) for r in item.rows)),
        )
