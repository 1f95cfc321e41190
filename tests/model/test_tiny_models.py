"""The tiny offline models: a fresh build in another process is the same model, file for file."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from workers.tiny_models import COMPLETE, build_all, recipe

FILES = ("tokenizer.json", "config.json", "model.safetensors")


def digest(model_dir: Path) -> dict[str, str]:
    return {name: hashlib.sha256((model_dir / name).read_bytes()).hexdigest() for name in FILES}


def test_a_build_in_another_process_is_identical(tiny_models: Path, tmp_path: Path) -> None:
    # Another interpreter, so anything that depends on hash order (as WordPieceTrainer's vocabulary did)
    # would differ.
    code = f"from pathlib import Path; from workers.tiny_models import build_all; build_all(Path({str(tmp_path)!r}))"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
    for name in ("tiny-sentiment", "tiny-bert", "tiny-gpt2", "tiny-marian-en-de"):
        assert digest(tmp_path / name) == digest(tiny_models / name), name


def test_a_build_by_another_recipe_is_made_again(tmp_path: Path) -> None:
    assert build_all(tmp_path, ["tiny-sentiment"])["tiny-sentiment"].get("skipped") is None
    assert build_all(tmp_path, ["tiny-sentiment"])["tiny-sentiment"] == {"skipped": True}
    marker = tmp_path / "tiny-sentiment" / COMPLETE
    assert json.loads(marker.read_text())["recipe"] == recipe()
    marker.write_text(json.dumps({"final_loss": 0.0, "recipe": "an older recipe"}))
    assert build_all(tmp_path, ["tiny-sentiment"])["tiny-sentiment"].get("skipped") is None
