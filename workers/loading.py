"""Load a registered model once: AutoModelFor<task> + AutoTokenizer, bitsandbytes, accelerate device_map.

Hub ids and local directories take the same path through ``from_pretrained``; only
``local_files_only`` differs. What was actually loaded (placement, dtype, quantization, memory) is
reported back so operators see it in ``GET /v1/models``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from queueformer.contract.errors import WorkerFatal
from queueformer.contract.jobs import Task
from queueformer.contract.registry import ModelEntry, Quantization
from queueformer.contract.tasks import spec_of

log = logging.getLogger(__name__)


def auto_class(task: Task) -> Any:
    """The transformers auto class the job-type table names for ``task`` (None: the task loads no model)."""
    name = spec_of(task).auto_class
    return getattr(transformers, name) if name else None


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    """A model and tokenizer in memory, with what the load resolved to."""

    model: PreTrainedModel
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the first stage under a device_map)."""
        embeddings: Any = self.model.get_input_embeddings()
        return torch.device(embeddings.weight.device)


# Classification heads are a few thousand weights with out_features = the label count: quantizing them
# saves nothing, costs accuracy, and bitsandbytes' packed CPU 4-bit kernel cannot take widths like 2.
CLASSIFIER_HEADS = ["classifier", "pre_classifier", "score"]


def quantization_config(entry: ModelEntry) -> BitsAndBytesConfig | None:
    if entry.quantization == Quantization.NONE:
        return None
    skip = (
        entry.skip_modules
        if entry.skip_modules is not None
        else (CLASSIFIER_HEADS if entry.task == Task.CLASSIFY else None)
    )
    if entry.quantization == Quantization.INT8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    compute = entry.compute_dtype if entry.compute_dtype != "auto" else entry.dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=entry.quantization.value,
        bnb_4bit_compute_dtype=DTYPES.get(compute, torch.float32),
        bnb_4bit_use_double_quant=entry.double_quant,
        llm_int8_skip_modules=skip,
    )


def load_kwargs(entry: ModelEntry, models_dir: Path, offload_folder: Path | None = None) -> tuple[str, dict[str, Any]]:
    """``from_pretrained`` arguments for an entry; shared by workers and by reference checks in tests."""
    source, local_only = entry.source(models_dir)
    kwargs: dict[str, Any] = {
        "revision": entry.revision,
        "local_files_only": local_only,
        "trust_remote_code": entry.trust_remote_code,
        "device_map": _device_map(entry.device_map),
    }
    if entry.dtype != "auto":
        kwargs["dtype"] = DTYPES[entry.dtype]
    else:
        kwargs["dtype"] = "auto"
    quant = quantization_config(entry)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if entry.max_memory:
        kwargs["max_memory"] = {(int(k) if str(k).isdigit() else k): v for k, v in entry.max_memory.items()}
    folder = entry.offload_folder or (str(offload_folder) if offload_folder else None)
    if folder:
        kwargs["offload_folder"] = folder
    return source, kwargs


def _device_map(value: str | dict[str, int | str]) -> Any:
    # "cuda:0"-style strings pin the whole model; "auto"/"balanced"/"sequential" let accelerate place it.
    if isinstance(value, dict):
        return {k: (int(v) if isinstance(v, str) and v.isdigit() else v) for k, v in value.items()}
    return value


def load(entry: ModelEntry, models_dir: Path, offload_folder: Path | None = None) -> Loaded:
    """Load ``entry``; any failure is ``WorkerFatal`` (a worker without its model must not consume)."""
    auto = auto_class(entry.task)
    if auto is None:
        raise WorkerFatal(f"model {entry.name!r}: task {entry.task.value!r} has no model to load")
    source, kwargs = load_kwargs(entry, models_dir, offload_folder)
    if entry.path is not None and "://" not in entry.path and not Path(source).is_dir():
        # Said plainly: from_pretrained would take a missing directory for a hub id and complain about its form.
        raise WorkerFatal(f"model {entry.name!r}: its directory {source} does not exist")
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            revision=entry.revision,
            local_files_only=kwargs["local_files_only"],
            trust_remote_code=entry.trust_remote_code,
        )
        model = auto.from_pretrained(source, **kwargs)
    except Exception as exc:  # every cause (missing files, bad config, device trouble) is fatal here
        raise WorkerFatal(f"model {entry.name!r} failed to load from {source!r}: {exc}") from exc
    model.eval()
    loaded = Loaded(model=model, tokenizer=tokenizer)
    loaded.info = describe(model, entry, time.perf_counter() - started)
    log.info("loaded %s: %s", entry.name, loaded.info)
    return loaded


def load_adapter(entry: ModelEntry, base: ModelEntry, adapter_dir: Path, models_dir: Path) -> Loaded:
    """A PEFT adapter over its base model, merged into the base weights so decoding costs what the base costs.

    The base loads unquantized: LoRA deltas cannot be merged into 4- or 8-bit weights.
    """
    from peft import PeftModel

    started = time.perf_counter()
    plain = base.model_copy(update={"quantization": Quantization.NONE, "device_map": entry.device_map})
    loaded = load(plain, models_dir)
    try:
        merged = PeftModel.from_pretrained(loaded.model, str(adapter_dir)).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir), local_files_only=True)
    except Exception as exc:
        raise WorkerFatal(f"adapter {entry.name!r} failed to load from {adapter_dir}: {exc}") from exc
    merged.eval()
    out = Loaded(model=merged, tokenizer=tokenizer)
    out.info = {**describe(merged, entry, time.perf_counter() - started), "adapter_merged": True}
    return out


def describe(model: PreTrainedModel, entry: ModelEntry, load_s: float) -> dict[str, Any]:
    """Placement, dtype, quantization and memory of a loaded model."""
    device_map = getattr(model, "hf_device_map", None)
    # transformers sets hf_device_map only when a model spans devices; otherwise report where weights live.
    placement = {k: str(v) for k, v in device_map.items()} if device_map else {"": str(next(model.parameters()).device)}
    bytes_by_device: Counter[str] = Counter()
    dtypes: Counter[str] = Counter()
    for p in model.parameters():
        bytes_by_device[str(p.device)] += p.nelement() * p.element_size()
        dtypes[str(p.dtype).removeprefix("torch.")] += p.nelement()
    return {
        "device_map": placement,
        "devices": sorted(bytes_by_device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "param_dtypes": dict(dtypes),
        "quantization": entry.quantization.value,
        "memory_bytes": int(model.get_memory_footprint()),
        "memory_bytes_by_device": dict(bytes_by_device),
        "load_seconds": round(load_s, 3),
    }
