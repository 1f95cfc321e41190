"""translate: a seq2seq model's ``generate`` (transformers 5 has no translation pipeline).

Example job::

    {"task": "translate", "model": "tiny-marian-en-de", "text": "the cat sleeps", "num_beams": 2}
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from queueformer.contract.jobs import Task, TranslateJob
from queueformer.contract.records import TranslateResult, Translation, Usage
from workers.engine.padding import pad_right, pad_token_id
from workers.handlers.base import Handler


@dataclass(frozen=True)
class TranslateInput:
    input_ids: tuple[int, ...]
    num_beams: int
    max_new_tokens: int


class TranslateHandler(Handler[TranslateJob, TranslateInput]):
    """Seq2seq translation with beams and length limits."""

    task = Task.TRANSLATE

    def preprocess(self, job: TranslateJob) -> TranslateInput:
        ids = self.encode(job.text, truncate=job.truncate, keep="left")
        beams = job.num_beams or self.model.generation_config.num_beams or 1
        return TranslateInput(tuple(ids), int(beams), job.max_new_tokens)

    def size(self, item: TranslateInput) -> int:
        return len(item.input_ids)

    def group_key(self, item: TranslateInput) -> Hashable:
        return (item.num_beams, item.max_new_tokens)

    def forward(self, batch: Sequence[TranslateInput]) -> list[Any]:
        ids, mask = pad_right(
            [x.input_ids for x in batch], pad_token_id(self.tokenizer, self.model.config), self.device
        )
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            num_beams=batch[0].num_beams,
            max_new_tokens=batch[0].max_new_tokens,
            use_cache=True,
        )
        return [self._trim(row) for row in out.tolist()]

    def _trim(self, row: list[int]) -> list[int]:
        """Drop the decoder start token and the padding after EOS."""
        start = self.model.generation_config.decoder_start_token_id
        if row and row[0] == start:
            row = row[1:]
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        for i, tok in enumerate(row):
            if tok in eos_ids:
                return row[: i + 1]
        return row

    def postprocess(self, item: TranslateInput, raw: Any) -> TranslateResult:
        text = self.tokenizer.decode(raw, skip_special_tokens=True)
        return TranslateResult(
            model=self.entry.name,
            translation=Translation(text=text, token_ids=raw),
            usage=Usage(prompt_tokens=len(item.input_ids), completion_tokens=len(raw)),
        )
