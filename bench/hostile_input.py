"""What two hostile batch input files cost the API at ``POST /v1/batches``: CPU seconds and peak RSS.

``python -m bench.hostile_input [--mib 200] [--redis-url redis://127.0.0.1:6379/15]``

The two files are the cheap denial of service of a batch create: ``newlines`` (the whole upload cap
of ``\\n`` bytes, so no request at all but millions of lines to walk) and ``one_line`` (the whole cap
as a single line with no newline). Each file is stored the way an upload stores it (``FileStore``) by
one process; a fresh process then builds the API, creates a batch from it through FastAPI's
TestClient and reports its own CPU time (user + system) and peak RSS before and after the request,
so neither the upload nor the test client's copy of a body is counted. The flushed Redis database is
the caller's (it defaults to ``QUEUEFORMER_TEST_REDIS_DB`` on the local server). Each run writes its
JSON to ``--out``; to compare code before and after a change, alternate runs of the two trees (e.g.
``git archive <old> | tar -x -C /tmp/old``, then run this module from each tree in turn).
``bench/results/hostile_input.json`` holds one such A/B/A sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CASES = ("newlines", "one_line")
MIB = 1 << 20


def _write(path: Path, case: str, size: int) -> None:
    block = (b"\n" if case == "newlines" else b"x") * MIB
    with open(path, "wb") as fh:
        for _ in range(size // MIB):
            fh.write(block)


def _settings(redis_url: str, root: Path, mib: int) -> Any:
    from queueformer.contract.settings import load_settings

    return load_settings(
        redis_url=redis_url,
        data_dir=root / "data",
        storage_url=f"file://{root / 'storage'}",
        quota={"max_upload_bytes": (mib + 1) * MIB},
        api={"reconcile_interval_s": 0},
    )


def _store(redis_url: str, root: Path, src: Path, mib: int) -> str:
    """Store ``src`` as the default tenant's batch file, the way an upload does; prints nothing else."""
    import redis

    from queueformer.server.files import FileStore
    from queueformer.server.storage import Storage

    settings = _settings(redis_url, root, mib)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    files = FileStore(client, Storage(settings.resolved_storage_url))
    with open(src, "rb") as fh:
        return files.create("default", src.name, "batch", fh, settings.quota.max_upload_bytes).id


def _rusage() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024  # Linux reports KiB


def _create(redis_url: str, root: Path, file_id: str, mib: int) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from api.app import create_app

    body = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    with TestClient(create_app(_settings(redis_url, root, mib))) as client:
        client.get("/healthz")
        cpu0, rss0 = _rusage()
        wall0 = time.perf_counter()
        resp = client.post("/v1/batches", json=body)
        wall = time.perf_counter() - wall0
        cpu1, rss1 = _rusage()
    return {
        "status": resp.status_code,
        "answer": resp.text[:300],
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu1 - cpu0, 3),
        "rss_before_mib": round(rss0, 1),
        "rss_peak_mib": round(rss1, 1),
        "rss_growth_mib": round(rss1 - rss0, 1),
    }


def _child(args: argparse.Namespace) -> int:
    root = Path(args.root)
    if args.phase == "store":
        sys.stdout.write(_store(args.redis_url, root, Path(args.src), args.mib) + "\n")
    else:
        sys.stdout.write(json.dumps(_create(args.redis_url, root, args.file_id, args.mib)) + "\n")
    return 0


def _run_child(*argv: str) -> str:
    cmd = [sys.executable, "-m", "bench.hostile_input", *argv]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
    return out.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    db = os.environ.get("QUEUEFORMER_TEST_REDIS_DB", "14")
    parser = argparse.ArgumentParser(prog="python -m bench.hostile_input")
    parser.add_argument("--mib", type=int, default=200, help="size of each hostile file (the default upload cap)")
    parser.add_argument("--redis-url", default=f"redis://127.0.0.1:6379/{db}", help="a database this run may flush")
    parser.add_argument("--out", type=Path, default=Path("hostile_input.json"), help="where this run's JSON goes")
    parser.add_argument("--label", default="", help="what code this run measured (e.g. a commit)")
    parser.add_argument("--phase", choices=["store", "create"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--file-id", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        return _child(args)

    import redis

    results: dict[str, Any] = {"mib": args.mib, "label": args.label, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with tempfile.TemporaryDirectory(prefix="qf-hostile-") as tmp:
        root = Path(tmp)
        for case in CASES:
            redis.Redis.from_url(args.redis_url).flushdb()
            src = root / f"{case}.jsonl"
            _write(src, case, args.mib * MIB)
            common = ["--root", str(root), "--mib", str(args.mib), "--redis-url", args.redis_url]
            file_id = _run_child("--phase", "store", "--src", str(src), *common)
            src.unlink()
            results[case] = json.loads(_run_child("--phase", "create", "--file-id", file_id, *common))
            r = results[case]
            sys.stdout.write(
                f"{case:>9}: {r['status']} in {r['wall_s']:.2f}s wall, {r['cpu_s']:.2f}s CPU; "
                f"RSS {r['rss_before_mib']:.0f} -> {r['rss_peak_mib']:.0f} MiB  {r['answer'][:120]}\n"
            )
        redis.Redis.from_url(args.redis_url).flushdb()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
