"""A base install (``pip install queueformer``, no extras) is enough for the SDK and the CLI.

Built from this tree into a fresh virtual environment, as a user on a laptop that only submits jobs
would install it: the contract and the client import, the CLI answers ``--help``, and nothing of the
server side (Redis client, Celery, fsspec) or of the workers (torch) came with it.
"""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_base_install_runs_the_cli_and_the_sdk(tmp_path: Path) -> None:
    env_dir = tmp_path / "base"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    cli = env_dir / "bin" / "queueformer"
    for args in (["--help"], ["submit", "--help"], ["run", "--help"], ["batch", "--help"]):
        out = subprocess.run([cli, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert out.returncode == 0 and "usage:" in out.stdout, (args, out.stdout, out.stderr)
    # Failures are plain lines on a base install too: no cluster here, no server extra for `keys`.
    for args, code in (
        (["batch", "list", "--url", "http://127.0.0.1:9"], 1),
        (["submit", "{not json"], 2),
        (["run", "missing.jsonl", "-o", "out.jsonl"], 2),
        (["keys", "list"], 1),
    ):
        out = subprocess.run([cli, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == code and 1 <= len(lines) <= 2 and "Traceback" not in out.stderr, (args, out.stderr)
    code = (
        "import importlib.util, sys\n"
        "import queueformer.contract.tasks, queueformer.contract.openai_batch, queueformer.contract.units\n"
        "from queueformer import Client\n"
        "Client('http://127.0.0.1:9').close()\n"
        "print([m for m in ('redis', 'celery', 'fsspec', 'torch', 'fastapi') if importlib.util.find_spec(m)])\n"
    )
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
