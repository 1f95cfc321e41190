"""Configurable bounds on every number and string a job may carry.

The job models carry hard caps in their field definitions (they show in the OpenAPI schema); these
limits are the operator's tighter, configurable caps (``QUEUEFORMER_LIMITS__MAX_NEW_TOKENS=...``). A
process installs its limits once at startup with :func:`install`; validators read them through
:func:`active`, so the API, the batch validator and the workers all enforce the same numbers.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class Limits(BaseModel):
    """Per-deployment caps on job parameters. Defaults suit a single GPU serving small models."""

    max_prompt_chars: int = Field(32_000, ge=1, le=1_000_000, description="Longest prompt/text, in characters.")
    max_new_tokens: int = Field(2048, ge=1, le=32_768, description="Largest max_new_tokens a job may ask for.")
    max_num_beams: int = Field(8, ge=1, le=64, description="Largest num_beams.")
    max_return_sequences: int = Field(8, ge=1, le=64, description="Largest num_return_sequences.")
    max_stop_sequences: int = Field(4, ge=0, le=32, description="Most stop strings per job.")
    max_stop_chars: int = Field(64, ge=1, le=1024, description="Longest stop string.")
    max_top_k: int = Field(1000, ge=1, le=100_000, description="Largest top_k for sampling, fill-mask and classify.")
    max_texts_per_job: int = Field(64, ge=1, le=10_000, description="Most texts in one classify job.")
    max_train_steps: int = Field(100_000, ge=1, le=10_000_000, description="Most optimizer steps in a fine-tune.")
    max_train_epochs: float = Field(100.0, gt=0, le=10_000, description="Most epochs in a fine-tune.")
    max_block_size: int = Field(4096, ge=8, le=131_072, description="Longest packed training block, in tokens.")
    max_train_batch_size: int = Field(256, ge=1, le=65_536, description="Largest per-device training batch.")
    max_metadata_pairs: int = Field(16, ge=0, le=64, description="Most metadata pairs on a job or batch.")


_active = Limits()


def install(limits: Limits) -> None:
    """Make ``limits`` the caps every job validation in this process enforces (call once at startup)."""
    global _active
    _active = limits


def active() -> Limits:
    return _active
