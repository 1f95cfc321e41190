"""translate: a seq2seq model's ``generate`` (transformers 5 has no translation pipeline).

Decoding knobs a job leaves unset are not passed, so ``generate`` takes them from the model's
``generation_config`` exactly as a direct call would. Jobs share a ``generate`` call only when every
knob matches; a seeded sampled job runs alone, seeded as ``torch.manual_seed(seed)`` before a direct
call would be, so its output does not depend on its company. Example job::

    {"task": "translate", "model": "tiny-marian-en-de", "text": "the cat sleeps", "num_beams": 2}
    {"task": "translate", "model": "tiny-m2m", "text": "the cat sleeps", "target_language": "de"}
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessorList

from queueformer.contract.errors import InvalidInput
from queueformer.contract.jobs import Task, TranslateJob
from queueformer.contract.records import TranslateResult, Translation, Usage
from workers.engine.padding import pad_right, pad_token_id
from workers.engine.penalties import OpenAIPenalties
from workers.handlers.base import Handler

# Job fields passed to ``generate`` under the same name when set.
_KNOBS = (
    "num_beams",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "num_return_sequences",
)
_solo = itertools.count()


@dataclass(frozen=True)
class TranslateInput:
    input_ids: tuple[int, ...]
    max_new_tokens: int
    knobs: tuple[tuple[str, Any], ...] = ()  # generate kwargs the job set, sorted
    stop: tuple[str, ...] = ()
    seed: int | None = None
    penalties: tuple[float, float] = (0.0, 0.0)  # OpenAI presence, frequency
    solo: int | None = field(default=None, compare=False)  # a seeded sampled job: never batched with others

    @property
    def num_beams(self) -> int:
        return int(dict(self.knobs).get("num_beams", 1))

    @property
    def n(self) -> int:
        return int(dict(self.knobs).get("num_return_sequences", 1))


def language_token_id(tokenizer: Any, language: str) -> int | None:
    """The id of a language's token: ``get_lang_id`` (M2M100), else an added or special token spelled as the
    code (NLLB ``fra_Latn``, mBART ``fr_XX``) or as M2M100's ``__fr__``; None if the tokenizer has none.
    Ordinary vocabulary entries never count: ``de`` may well be a word piece."""
    get_lang_id = getattr(tokenizer, "get_lang_id", None)
    if callable(get_lang_id):
        try:
            return int(get_lang_id(language))
        except (KeyError, ValueError):
            return None
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_tokens)
    for token in (f"__{language}__", language):
        if token in added or token in special:
            return int(tokenizer.convert_tokens_to_ids(token))
    return None


class TranslateHandler(Handler[TranslateJob, TranslateInput]):
    """Seq2seq translation with generate's decoding knobs, language selection and stop strings."""

    task = Task.TRANSLATE

    def preprocess(self, job: TranslateJob) -> TranslateInput:
        ids = self.encode(job.text, truncate=job.truncate, keep="left")
        knobs: dict[str, Any] = {k: getattr(job, k) for k in _KNOBS if getattr(job, k) is not None}
        if job.num_return_sequences == 1:
            knobs.pop("num_return_sequences")
        forced = job.forced_bos_token_id
        if job.target_language is not None:
            forced = language_token_id(self.tokenizer, job.target_language)
            if forced is None:
                raise InvalidInput(
                    f"{self.entry.name}'s tokenizer has no token for language {job.target_language!r}",
                    param="target_language",
                )
        if forced is not None:
            width = int(self.model.config.get_text_config().vocab_size)
            if forced >= width:
                raise InvalidInput(f"token {forced} is outside the vocabulary of {width}", param="forced_bos_token_id")
            knobs["forced_bos_token_id"] = forced
        do_sample = job.do_sample if job.do_sample is not None else bool(self.model.generation_config.do_sample)
        n, beams = job.num_return_sequences, job.num_beams or self.model.generation_config.num_beams or 1
        if n > 1 and not do_sample and beams < n:
            raise InvalidInput(
                "num_return_sequences > 1 needs do_sample=true or num_beams >= num_return_sequences",
                param="num_return_sequences",
            )
        return TranslateInput(
            tuple(ids),
            job.max_new_tokens,
            knobs=tuple(sorted(knobs.items())),
            stop=tuple(job.stop),
            seed=job.seed if do_sample else None,
            penalties=(job.presence_penalty, job.frequency_penalty),
            solo=next(_solo) if do_sample and job.seed is not None else None,
        )

    def size(self, item: TranslateInput) -> int:
        return len(item.input_ids)

    def group_key(self, item: TranslateInput) -> Hashable:
        return (item.max_new_tokens, item.knobs, item.stop, item.penalties, item.solo)

    def forward(self, batch: Sequence[TranslateInput]) -> list[Any]:
        first = batch[0]
        ids, mask = pad_right(
            [x.input_ids for x in batch], pad_token_id(self.tokenizer, self.model.config), self.device
        )
        kwargs: dict[str, Any] = dict(first.knobs)
        if first.stop:
            kwargs.update(stop_strings=list(first.stop), tokenizer=self.tokenizer)
        if any(first.penalties):
            # The decoder's input starts with its start token; what follows is the output.
            kwargs["logits_processor"] = LogitsProcessorList([OpenAIPenalties(*first.penalties, prompt_len=1)])
        if first.seed is not None:
            torch.manual_seed(first.seed)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=first.max_new_tokens, use_cache=True, **kwargs
        )
        rows = [self._trim(row) for row in out.tolist()]
        return [rows[i * first.n : (i + 1) * first.n] for i in range(len(batch))]

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
        translations = []
        for tokens in raw:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            hits = [text.find(s) for s in item.stop if s in text]
            translations.append(Translation(text=text[: min(hits)] if hits else text, token_ids=tokens))
        return TranslateResult(
            model=self.entry.name,
            translation=translations[0],
            translations=translations,
            usage=Usage(prompt_tokens=len(item.input_ids), completion_tokens=sum(len(t) for t in raw)),
        )
