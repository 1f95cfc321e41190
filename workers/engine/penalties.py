"""OpenAI's presence and frequency penalties as a transformers logits processor.

``generate`` has no processor with OpenAI's additive penalties (its ``repetition_penalty`` divides
or multiplies a logit, and counts the prompt), so ``OpenAIPenalties`` implements OpenAI's formula:

    logit[j] -= frequency_penalty * c[j] + presence_penalty * (c[j] > 0)

where ``c[j]`` counts token ``j`` among the tokens generated so far (the prompt does not count).
It is stateless and follows transformers' processor protocol: the decode engine passes it to
``_get_logits_processor`` and ``model.generate`` takes it as a custom ``logits_processor``, so both
apply it where ``generate`` puts custom processors, after the model's own processors and before
temperature, top-k and top-p. (OpenAI's ``logit_bias`` is transformers' ``sequence_bias`` with
one-token sequences.)
"""

from __future__ import annotations

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


def openai_penalties(presence: float, frequency: float, prompt_len: int) -> tuple[LogitsProcessor, ...]:
    """The processors a request's OpenAI penalties need (none for the defaults)."""
    return (OpenAIPenalties(presence, frequency, prompt_len),) if presence or frequency else ()


__all__ = ["OpenAIPenalties", "openai_penalties"]
