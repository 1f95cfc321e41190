"""The model registry: which served model names exist, what they run and how they are loaded.

A YAML file (its path comes from settings) maps each served name to its task, where its weights come
from (a hub id or a local directory), its queue and how workers load it (quantization, dtype,
device_map). Only registered names are accepted: the registry is the allowlist. Models produced by
fine-tune jobs are added at run time to an overlay kept in Redis (see :mod:`queueformer.server.overlay`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from queueformer.contract.errors import ModelNotFound, TaskMismatch
from queueformer.contract.jobs import MODEL_NAME_PATTERN, Task

_QUEUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class Quantization(StrEnum):
    NONE = "none"
    INT8 = "int8"
    NF4 = "nf4"
    FP4 = "fp4"


DType = Literal["auto", "float32", "bfloat16", "float16"]


class ModelEntry(BaseModel):
    """One served model. ``hub_id`` and ``path`` are two spellings of the same loading path."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    task: Task
    hub_id: str | None = Field(None, description="A Hugging Face hub id, e.g. distilgpt2.")
    path: str | None = Field(None, description="A local directory or storage URI; relative paths start at models_dir.")
    revision: str | None = Field(None, description="Pinned hub revision (commit, tag or branch).")
    queue: str = Field("", description="Celery queue; defaults to the model name.")
    quantization: Quantization = Quantization.NONE
    compute_dtype: DType = Field("auto", description="bitsandbytes compute dtype for 4-bit; auto follows dtype.")
    double_quant: bool = Field(False, description="bitsandbytes nested quantization for 4-bit.")
    skip_modules: list[str] | None = Field(
        None, description="Modules kept unquantized; default: the output head (classification heads for classify)."
    )
    dtype: DType = "auto"
    device_map: str | dict[str, int | str] = Field("auto", description="'auto', 'cpu', 'cuda:0' or an explicit map.")
    max_memory: dict[str, str] | None = Field(
        None, description="Per-device caps for device_map, e.g. {0: 20GiB, cpu: 64GiB}."
    )
    offload_folder: str | None = None
    max_batch_size: int = Field(32, ge=1, le=4096, description="Most sequences decoded together.")
    max_batch_tokens: int = Field(
        8192,
        ge=16,
        description=(
            "Most prompt tokens prefilled in one forward (prompts packed end to end where the model's attention "
            "allows, else in padded groups; a longer prompt is prefilled alone)."
        ),
    )
    max_input_tokens: int | None = Field(None, ge=1, description="Longest accepted input; default: the model's limit.")
    kv_cache_tokens: int = Field(
        65_536,
        ge=64,
        description="Most KV-cache positions (batch x padded length) held at once: rows join a running batch "
        "while rows x the longest final length (prompt + max tokens) fits, an eighth of the batch at a time. "
        "Raise it with max_batch_size, or the budget, not the cap, sets the batch.",
    )
    prefix_cache_tokens: int = Field(
        8192,
        ge=0,
        description="KV positions kept for recent shared prompt prefixes (part of kv_cache_tokens); 0 turns "
        "prefix reuse off.",
    )
    static_decode: Literal["auto", "on", "eager", "off"] = Field(
        "auto",
        description="Decode steps on static shapes (bucketed batch, preallocated KV arena) replayed as CUDA "
        "graphs, without per-step Python: 'auto' uses them where the model is on a CUDA device, 'on' also "
        "elsewhere (the same code run eagerly: slower on CPU, for checking), 'eager' runs the static shapes "
        "without graphs everywhere (for checking the graphs), 'off' keeps the eager step. "
        "Models the graphs cannot hold (int8 with outlier splitting, offloaded or multi-device, custom "
        "attention masks) use the eager step. The arena is sized by powers of two of the running batch, "
        "beyond kv_cache_tokens.",
    )
    trust_remote_code: bool = False
    base_model: str | None = Field(None, description="For fine-tuned models: the registered base model.")
    adapter: bool = Field(False, description="The weights at path are a PEFT adapter over base_model, merged at load.")
    tenant: str | None = Field(None, description="For fine-tuned models: the tenant that owns it (others get 404).")
    created: int | None = Field(
        None,
        ge=0,
        description="Unix time the model was registered (fine-tuned models get it when they register); "
        "/v1/models shows when the API loaded the registry for entries without one.",
    )

    @model_validator(mode="after")
    def _source_and_queue(self) -> ModelEntry:
        if self.task != Task.ECHO and (self.hub_id is None) == (self.path is None):
            raise ValueError(f"model {self.name!r}: give exactly one of hub_id or path")
        if not self.queue:
            self.queue = self.name.replace("/", "-").replace(":", "-")
        if not _QUEUE_RE.fullmatch(self.queue):
            raise ValueError(f"model {self.name!r}: queue {self.queue!r} must be letters, digits, '.', '_' or '-'")
        if self.adapter and not self.base_model:
            raise ValueError(f"model {self.name!r}: an adapter needs base_model")
        return self

    def source(self, models_dir: Path) -> tuple[str, bool]:
        """What ``from_pretrained`` is given, and whether it must be read from local files only."""
        if self.path is not None:
            if "://" in self.path:
                return self.path, True
            p = Path(self.path)
            return str(p if p.is_absolute() else models_dir / p), True
        assert self.hub_id is not None
        return self.hub_id, False

    def public(self) -> dict[str, Any]:
        """What /v1/models shows (no local paths)."""
        return {
            "id": self.name,
            "created": self.created,
            "task": self.task.value,
            "queue": self.queue,
            "source": self.hub_id or "local",
            "revision": self.revision,
            "quantization": self.quantization.value,
            "dtype": self.dtype,
            "device_map": self.device_map,
            "max_batch_size": self.max_batch_size,
            "max_input_tokens": self.max_input_tokens,
            "base_model": self.base_model,
            "adapter": self.adapter,
        }


class FineTuneConfig(BaseModel):
    """Where fine-tune jobs run and where their results are served."""

    model_config = ConfigDict(extra="forbid")

    queue: str = "fine-tune"
    serve_queue: str = Field("fine-tuned", description="Queue of the workers that load fine-tuned models on demand.")
    bases: list[str] | None = Field(None, description="Models that may be fine-tuned; default: every generate model.")


class Registry:
    """An immutable view of the registered models, looked up by served name."""

    def __init__(self, entries: Mapping[str, ModelEntry], fine_tune: FineTuneConfig | None = None) -> None:
        self._entries = dict(entries)
        self.fine_tune = fine_tune or FineTuneConfig()

    @classmethod
    def from_yaml(cls, text: str, origin: str = "<registry>") -> Registry:
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict) or not isinstance(raw.get("models", {}), dict):
            raise ValueError(f"{origin}: expected a mapping with a 'models' mapping")
        try:
            entries = {name: ModelEntry(name=name, **(spec or {})) for name, spec in raw.get("models", {}).items()}
            ft = FineTuneConfig(**(raw.get("fine_tune") or {}))
        except ValidationError as exc:
            raise ValueError(f"{origin}: {exc}") from exc
        return cls(entries, ft)

    @classmethod
    def load(cls, ref: str) -> Registry:
        """Load a bundled registry by name ('tiny', 'hub') or a YAML file by path."""
        if ref in BUNDLED:
            text = resources.files("queueformer.registries").joinpath(f"{ref}.yaml").read_text("utf-8")
            return cls.from_yaml(text, origin=f"bundled registry {ref!r}")
        return cls.from_yaml(Path(ref).read_text("utf-8"), origin=ref)

    def with_entries(self, extra: Mapping[str, ModelEntry]) -> Registry:
        """This registry plus run-time entries (fine-tuned models); static entries win on a name clash."""
        return Registry({**extra, **self._entries}, self.fine_tune)

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str, task: Task | str | None = None, *, tenant: str | None = None) -> ModelEntry:
        """The entry for ``name``; raises ``ModelNotFound`` listing the registered names, or ``TaskMismatch``."""
        entry = self._entries.get(name)
        if entry is None or (entry.tenant is not None and tenant is not None and entry.tenant != tenant):
            visible = [e.name for e in self if e.tenant is None or tenant is None or e.tenant == tenant]
            raise ModelNotFound(
                f"model {name!r} is not registered; registered models: {', '.join(sorted(visible))}",
                param="model",
                details={"registered": sorted(visible)},
            )
        if (
            task is not None
            and entry.task != Task(task)
            and not (Task(task) == Task.FINE_TUNE and entry.task == Task.GENERATE)
        ):
            raise TaskMismatch(f"model {name!r} serves {entry.task.value!r}, not {Task(task).value!r}", param="model")
        return entry

    def queues(self) -> dict[str, list[ModelEntry]]:
        """Queue name -> the entries it serves (one per queue in a normal registry)."""
        out: dict[str, list[ModelEntry]] = {}
        for entry in self:
            out.setdefault(entry.queue, []).append(entry)
        out.setdefault(self.fine_tune.queue, [])
        out.setdefault(self.fine_tune.serve_queue, [])
        return out

    def queue_for(self, entry: ModelEntry, task: Task | str) -> str:
        """Where a job for ``entry`` runs: fine-tunes go to the fine-tune queue, the rest to the model's queue."""
        if Task(task) == Task.FINE_TUNE:
            if self.fine_tune.bases is not None and entry.name not in self.fine_tune.bases:
                raise TaskMismatch(f"model {entry.name!r} is not open to fine-tuning", param="model")
            return self.fine_tune.queue
        return entry.queue


BUNDLED = ("tiny", "hub")
