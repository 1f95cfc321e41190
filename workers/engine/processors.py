"""Decoding parameters and per-row token choice, through transformers' own generation machinery.

A job's decoding fields are merged over the model's ``generation_config`` (then transformers' defaults)
by the model's own ``_prepare_generation_config``, exactly as ``model.generate`` merges its keyword
arguments: that config is the one source of truth for every path a request may take. The decode engine
builds each row's logits processors and stopping criteria from it with ``_get_logits_processor`` and
``_get_stopping_criteria``, so any processor ``generate`` supports runs in the continuous-batching loop,
each row with its own instances (its own state), applied to that row's unpadded ids, as ``generate``
would apply them to that prompt alone.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    MaxTimeCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

from queueformer.contract.errors import InvalidInput

log = logging.getLogger(__name__)

# The generation modes each path runs; anything else (contrastive search, DoLa, diverse or constrained beam
# search) is Hub code in transformers 5 that workers never run, so it is refused rather than decoded otherwise.
ENGINE_MODES = frozenset({GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE})
GENERATE_MODES = frozenset({GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE})
# Fields whose value can select a mode, for naming the culprit when a mode is refused.
_MODE_FIELDS = (
    "num_beam_groups",
    "diversity_penalty",
    "penalty_alpha",
    "dola_layers",
    "constraints",
    "force_words_ids",
)


def resolve(model: Any, fields: dict[str, Any], pad_id: int) -> GenerationConfig:
    """The request's ``fields`` (``None`` = unset) over the model's generation config over the defaults."""
    given = {k: v for k, v in fields.items() if v is not None}
    try:
        config, unused = model._prepare_generation_config(None, **given)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"the model's generation config cannot take these parameters: {exc}") from exc
    if unused:
        name = next(iter(unused))
        raise InvalidInput(f"{name} is not a generation parameter", param=name)
    if config.pad_token_id is None:
        config.pad_token_id = pad_id  # generate falls back to EOS, which may be empty (ignore_eos)
    try:
        config.validate()
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    mode = config.get_generation_mode()
    if mode not in ENGINE_MODES | GENERATE_MODES:
        culprit = next((f for f in _MODE_FIELDS if getattr(config, f, None) not in (None, 0, 1, 0.0)), None)
        raise InvalidInput(
            f"{mode.value.replace('_', ' ')} is not available: transformers' generate no longer includes it",
            param=culprit,
        )
    vocab = int(model.config.get_text_config().vocab_size)
    for name in ("bad_words_ids", "suppress_tokens", "sequence_bias", "eos_token_id", "begin_suppress_tokens"):
        if any(not 0 <= t < vocab for t in _token_ids(getattr(config, name, None))):
            raise InvalidInput(f"{name} holds a token id outside the model's vocabulary (0..{vocab - 1})", param=name)
    return config


def _token_ids(value: Any) -> list[int]:
    """Every int inside a nested list/tuple/dict-keys value (sequence_bias biases are floats and skipped)."""
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, dict):
        return [t for key in value for t in _token_ids(list(key) if isinstance(key, tuple) else key)]
    if isinstance(value, list | tuple):
        return [t for x in value for t in _token_ids(x)]
    return []


def eos_ids(config: GenerationConfig) -> frozenset[int]:
    eos = config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset(eos if isinstance(eos, list) else [int(eos)])


@dataclass
class RowDecoding:
    """One row's logits processors and the stopping criteria the engine does not handle itself."""

    processors: LogitsProcessorList
    criteria: StoppingCriteriaList

    def start(self) -> None:
        """Decoding starts now: time limits count from here, as ``generate`` counts from its call."""
        for c in self.criteria:
            if isinstance(c, MaxTimeCriteria):
                c.initial_timestamp = time.time()

    def stopped(self, ids: torch.Tensor, scores: torch.Tensor) -> bool:
        return bool(self.criteria) and bool(self.criteria(cast(torch.LongTensor, ids), scores).any())


# The engine stops rows on length, EOS and stop strings itself (it needs where a stop string begins).
_ENGINE_CRITERIA = (MaxLengthCriteria, EosTokenCriteria, StopStringCriteria)


def row_decoding(
    model: Any,
    config: GenerationConfig,
    prompt_length: int,
    device: torch.device,
    custom: Sequence[LogitsProcessor] = (),
) -> RowDecoding:
    """Fresh processors and criteria for one row, from ``generate``'s own builders (``custom`` processors go
    where ``generate`` puts its ``logits_processor`` argument)."""
    cfg = copy.deepcopy(config)
    cfg.max_length = prompt_length + (cfg.max_new_tokens or 0)
    if cfg.min_new_tokens is not None:
        cfg.min_length = prompt_length + cfg.min_new_tokens
    model._prepare_special_tokens(cfg, True, device=device, batch_size=1)
    processors = model._get_logits_processor(
        generation_config=cfg,
        input_ids_seq_length=prompt_length,
        device=device,
        model_kwargs={},
        logits_processor=LogitsProcessorList(custom),
    )
    cfg.stop_strings = None
    criteria = model._get_stopping_criteria(generation_config=cfg, stopping_criteria=StoppingCriteriaList())
    extra = StoppingCriteriaList(c for c in criteria if not isinstance(c, _ENGINE_CRITERIA))
    return RowDecoding(processors, extra)


@dataclass
class Scored:
    """A chosen token's log-probability and the most likely tokens where it was chosen."""

    logprob: float
    top: list[tuple[int, float]]


def score(logprobs: torch.Tensor, token: int, k: int) -> Scored:
    """``logprobs`` is one row's log-softmax; alternatives that processors ruled out (-inf) are dropped."""
    top: list[tuple[int, float]] = []
    if k:
        values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
        top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True) if v != float("-inf")]
    return Scored(float(logprobs[token]), top)


class Row(Protocol):
    """What ``pick`` needs of a row: its processors, sampler, ids so far and how many alternatives to score."""

    decoding: RowDecoding | None
    generator: torch.Generator | None

    @property
    def top_logprobs(self) -> int | None:
        """None: no log-probabilities; else how many alternatives to score with the chosen token."""

    def ids(self) -> torch.Tensor:
        """``[1, length]``: the row's prompt and generated tokens."""


_BLOCK = 128


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, dim=-1)`` (the first maximum of each row), without argmax's slow CPU kernel.

    On a CPU argmax over ``[256, 8192]`` float32 took 1.7 ms, a max reduction 0.07 ms: the maximum is
    taken per block of 128, then argmax runs over the block maxima and over the one block holding the
    first maximum. Rows with NaN (argmax picks the NaN) and other devices keep argmax.
    """
    vocab = logits.shape[-1]
    if logits.device.type != "cpu" or vocab < 4 * _BLOCK:
        return torch.argmax(logits, dim=-1)
    full = vocab - vocab % _BLOCK
    maxima = logits[:, :full].unflatten(-1, (full // _BLOCK, _BLOCK)).amax(-1)
    if full < vocab:
        maxima = torch.cat([maxima, logits[:, full:].amax(-1, keepdim=True)], dim=-1)
    best = maxima.amax(-1, keepdim=True)
    block = (maxima == best).to(torch.uint8).argmax(-1)  # the first block holding a row's maximum
    # that block's columns (the last block's overhang clamped onto the row's last column, after it in order)
    cols = (block[:, None] * _BLOCK + torch.arange(_BLOCK, device=logits.device)).clamp_(max=vocab - 1)
    chosen = block * _BLOCK + (logits.gather(1, cols) == best).to(torch.uint8).argmax(-1)
    nan = torch.isnan(best[:, 0])
    if bool(nan.any()):
        chosen[nan] = torch.argmax(logits[nan], dim=-1)
    return chosen


@torch.inference_mode()
def pick(logits: torch.Tensor, rows: Sequence[Row]) -> tuple[list[int], list[Scored | None]]:
    """Each row's next token from its processed scores, and its log-probability where asked for.

    ``logits`` ([rows, vocab], float32) is processed in place row by row, so the greedy rows of the
    whole batch take one argmax and log-probabilities are read from the very scores sampled from.
    """
    active = [(i, r) for i, r in enumerate(rows) if (r.decoding is not None and r.decoding.processors) or r.generator]
    for i, r in active:
        if r.decoding is not None and r.decoding.processors:
            ids = cast(torch.LongTensor, r.ids().to(logits.device))
            logits[i : i + 1] = r.decoding.processors(ids, logits[i : i + 1])
    chosen: list[int] = greedy(logits).tolist()
    for i, r in active:
        if r.generator is not None:
            probs = torch.softmax(logits[i : i + 1], dim=-1).cpu()
            chosen[i] = int(torch.multinomial(probs, 1, generator=r.generator).item())
    scored: list[Scored | None] = [None] * len(rows)
    wanted = [(i, r.top_logprobs) for i, r in enumerate(rows) if r.top_logprobs is not None]
    if wanted:
        logprobs = torch.log_softmax(logits[[i for i, _ in wanted]], dim=-1).cpu()
        for j, (i, k) in enumerate(wanted):
            scored[i] = score(logprobs[j], chosen[i], k)
    return chosen, scored


@torch.inference_mode()
def prompt_scores(logits: torch.Tensor, prompt: Sequence[int], k: int) -> list[Scored | None]:
    """Prompt tokens scored by the model's raw logits ``[len(prompt), vocab]`` (the first has no score)."""
    out: list[Scored | None] = [None]
    if len(prompt) > 1:
        logprobs = torch.log_softmax(logits[:-1].float(), dim=-1).cpu()
        out += [score(logprobs[j], prompt[j + 1], k) for j in range(len(prompt) - 1)]
    return out


__all__ = ["RowDecoding", "Scored", "eos_ids", "greedy", "pick", "prompt_scores", "resolve", "row_decoding"]
