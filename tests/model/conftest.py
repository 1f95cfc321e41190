"""Fixtures for tests on the tiny models: registries with quantized variants and reference loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import transformers

from queueformer.contract.registry import ModelEntry, Registry
from workers.loading import auto_class, load_kwargs

FAMILIES = {
    "gen": ("generate", "tiny-gpt2"),
    "mlm": ("fill-mask", "tiny-bert"),
    "cls": ("classify", "tiny-sentiment"),
    "mt": ("translate", "tiny-marian-en-de"),
}
QUANTS = ("none", "int8", "nf4")
# Greedy decoders also run in bf16 (the dtype the bulk benchmark serves on CPUs with native bf16);
# their reference is plain transformers in bf16, not the fp32 model.
BF16_FAMILIES = ("gen", "mt")
DECODER_VARIANTS = (*QUANTS, "bf16")


def equivalence_registry(path: Path) -> Registry:
    """Every inference family in fp32, int8 and nf4 (the decoders in bf16 too), each on its own queue."""
    lines = ["models:"]
    for fam, (task, model_dir) in FAMILIES.items():
        variants = [(q, q, "float32") for q in QUANTS]
        if fam in BF16_FAMILIES:
            variants.append(("bf16", "none", "bfloat16"))
        for name, quant, dtype in variants:
            lines += [
                f"  {fam}-{name}:",
                f"    task: {task}",
                f"    path: {model_dir}",
                f"    quantization: {quant}",
                f"    dtype: {dtype}",
                "    device_map: cpu",
                "    max_batch_size: 16",
            ]
    path.write_text("\n".join(lines) + "\n")
    return Registry.load(str(path))


def reference(entry: ModelEntry, models_dir: Path) -> tuple[Any, Any]:
    """Plain transformers: the same from_pretrained call (same BitsAndBytesConfig), no queueformer code."""
    transformers.logging.set_verbosity_error()
    source, kwargs = load_kwargs(entry, models_dir)
    model = auto_class(entry.task).from_pretrained(source, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def registry_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("registry") / "equivalence.yaml"
    equivalence_registry(path)
    return path
