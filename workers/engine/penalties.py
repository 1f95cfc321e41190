"""OpenAI's sampling adjustments as transformers logits processors: presence/frequency penalties and logit bias.

``generate`` has no processor with OpenAI's additive penalties (its ``repetition_penalty`` divides
or multiplies a logit, and counts the prompt), so ``OpenAIPenalties`` implements OpenAI's formula:

    logit[j] -= frequency_penalty * c[j] + presence_penalty * (c[j] > 0)

where ``c[j]`` counts token ``j`` among the tokens generated so far (the prompt does not count).
``TokenBias`` adds a bias to single tokens, as ``SequenceBiasLogitsProcessor`` does for length-one
sequences, without that class's check-and-raise at the first step (ids are checked when the job is
prepared, so a bad id is a 422, never an error inside the decode loop). Both are stateless per row
and follow transformers' processor protocol, so the decode engine, ``model.generate`` (custom
``logits_processor``) and beam search apply them alike, after the model's own penalties and before
temperature, top-k and top-p.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import LogitsProcessor


class OpenAIPenalties(LogitsProcessor):
    """Presence and frequency penalties over the tokens after ``prompt_len`` (OpenAI's definition)."""

    def __init__(self, presence: float, frequency: float, prompt_len: int) -> None:
        self.presence = float(presence)
        self.frequency = float(frequency)
        self.prompt_len = int(prompt_len)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros(scores.shape, dtype=scores.dtype, device=scores.device)
        counts.scatter_add_(
            1, generated.to(scores.device), torch.ones(generated.shape, dtype=scores.dtype, device=scores.device)
        )
        penalty = counts * self.frequency + (counts > 0).to(scores.dtype) * self.presence
        return scores - penalty  # type: ignore[return-value]


class TokenBias(LogitsProcessor):
    """Add a fixed bias to the logits of given token ids (OpenAI's ``logit_bias``)."""

    def __init__(self, bias: Mapping[int, float]) -> None:
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        del input_ids
        out = scores.clone()
        ids = self.ids.to(scores.device)
        out[:, ids] += self.values.to(scores.device, scores.dtype)
        return out  # type: ignore[return-value]


def openai_processors(
    *, presence: float, frequency: float, logit_bias: Mapping[int, float], prompt_len: int
) -> tuple[LogitsProcessor, ...]:
    """The processors a request's OpenAI knobs need (none for the defaults)."""
    procs: list[LogitsProcessor] = []
    if logit_bias:
        procs.append(TokenBias(logit_bias))
    if presence or frequency:
        procs.append(OpenAIPenalties(presence, frequency, prompt_len))
    return tuple(procs)


__all__ = ["OpenAIPenalties", "TokenBias", "openai_processors"]
