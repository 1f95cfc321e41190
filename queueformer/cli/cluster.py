"""``up`` (the whole cluster on this machine), ``demo``, ``api`` and ``keys``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pydantic import ValidationError

from queueformer import bulk
from queueformer.cli.common import cluster_file, read_cluster_file, write_cluster_file
from queueformer.cli.models import build_tiny_models
from queueformer.client import Client
from queueformer.contract.settings import Settings, load_settings

if TYPE_CHECKING:
    from queueformer.server.cluster import Cluster
    from queueformer.server.tenants import ApiKeys

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def add(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="run Redis (embedded unless configured), the API, workers and Flower until Ctrl-C")
    up.add_argument("--port", type=int, default=8000, help="API port")
    up.add_argument("--flower-port", type=int, default=5555, help="Flower port (0: no Flower)")
    up.add_argument(
        "--worker-per-queue", action="store_true", help="one worker process per queue instead of one in all"
    )
    up.set_defaults(func=run_up)

    demo = sub.add_parser("demo", help="build tiny models, start a cluster, run the bundled examples, stop")
    demo.add_argument("--input", type=Path, default=EXAMPLES / "prompts.jsonl")
    demo.add_argument("--output", type=Path, default=None, help="default: <data_dir>/demo-output.jsonl")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.set_defaults(func=run_demo)

    api = sub.add_parser("api", help="run the HTTP API (uvicorn)")
    api.add_argument("--host", default=None)
    api.add_argument("--port", type=int, default=None)
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    api.set_defaults(func=run_api)

    keys = sub.add_parser("keys", help="API keys (stored hashed)")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="issue a key for a tenant and print it once")
    create.add_argument("--tenant", required=True)
    create.set_defaults(func=create_key)
    listing = ksub.add_parser("list", help="list keys (id, prefix, tenant, created; never the key)")
    listing.add_argument("--tenant", default=None, help="only this tenant's keys (default: every tenant's)")
    listing.add_argument("--json", action="store_true", help="one JSON object per key")
    listing.set_defaults(func=list_keys)
    revoke = ksub.add_parser("revoke", help="revoke a key, given the key or its id; it stops working at once")
    revoke.add_argument("key", help="the key (qf-...) or its id (key_...)")
    revoke.set_defaults(func=revoke_key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_up(args: argparse.Namespace) -> int:
    from queueformer.server.cluster import Cluster

    settings = load_settings()
    ensure_tiny_models(settings)
    registry_queues: list[list[str]] | None = None
    if args.worker_per_queue:
        from queueformer.contract.registry import Registry

        registry_queues = [[q] for q in sorted(Registry.load(settings.registry).queues())]
    cluster = Cluster(settings, api_port=args.port, flower_port=args.flower_port or None, worker_groups=registry_queues)
    stop = False

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cluster.start()
    info = record_cluster(settings, cluster)
    try:
        cluster.wait_ready()
        sys.stdout.write(f"queueformer is up: API {cluster.api_url} (docs at {cluster.api_url}/docs)\n")
        if cluster.flower_port:
            sys.stdout.write(f"Flower http://127.0.0.1:{cluster.flower_port} (basic auth {cluster.flower_auth})\n")
        if cluster.redis is not None:
            sys.stdout.write(f"embedded Redis {cluster.redis.display_url} (AOF in {cluster.redis.data_dir})\n")
        for message in model_failures(cluster):
            sys.stdout.write(f"warning: {message}\n")
        sys.stdout.write(f"logs in {cluster.log_dir}; Ctrl-C stops everything\n")
        while not stop:
            cluster.check_alive()
            time.sleep(0.5)
    finally:
        sys.stdout.write("stopping...\n")
        cluster.stop()
        forget_cluster(info)
    return 0


def record_cluster(settings: Settings, cluster: Cluster) -> Path:
    """Write where this cluster answers (API, Redis with its password, Flower and its login) for other commands."""
    info = {
        "url": cluster.api_url,
        "redis_url": cluster.redis_url,
        "flower_url": f"http://127.0.0.1:{cluster.flower_port}" if cluster.flower_port else None,
        "flower_auth": cluster.flower_auth,
        "pid": os.getpid(),
    }
    return write_cluster_file(settings.data_dir, info)


def forget_cluster(path: Path) -> None:
    """Remove the cluster file if it is still this process's (a later `up` may have replaced it)."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text("utf-8")).get("pid") == os.getpid():
            path.unlink()


def ensure_tiny_models(settings: Settings) -> None:
    """With the bundled tiny registry, build whatever tiny model is missing (once; later runs skip).

    A failed build does not stop the cluster: the workers serve every model that loads and say, per
    entry, which could not and what to do.
    """
    if settings.registry != "tiny":
        return
    code = build_tiny_models(settings.resolved_models_dir, quiet=True)
    if code != 0:
        sys.stderr.write(
            f"building the tiny models into {settings.resolved_models_dir} failed (exit code {code}, reason above); "
            "starting with the models there are\n"
        )


def model_failures(cluster: Cluster) -> list[str]:
    """What the workers said about registry entries they could not load (entry, why, what to do)."""
    from queueformer.server.connection import connect
    from queueformer.server.fleet import Fleet

    return [msg for w in Fleet(connect(cluster.redis_url)).members() for msg in (w.get("failed") or {}).values()]


def run_demo(args: argparse.Namespace) -> int:
    from queueformer.server.cluster import Cluster

    settings = load_settings()
    ensure_tiny_models(settings)
    out = args.output or settings.data_dir / "demo-output.jsonl"
    endpoint, lines = bulk.to_batch_lines(args.input, "tiny-gpt2", "generate", {"max_new_tokens": args.max_new_tokens})
    cluster = Cluster(settings, api_port=_free_port())
    with cluster.running() as c, Client(c.api_url) as qf:
        sys.stdout.write(f"cluster up at {c.api_url}; running {len(lines)} requests from {args.input}\n")
        report = bulk.run(qf, endpoint, lines, out)
    rows = [json.loads(x) for x in out.read_text("utf-8").splitlines()]
    for line, row in zip(lines, rows, strict=True):
        prompt = line["body"].get("prompt") or line["body"].get("text") or ""
        sys.stdout.write(f"{row['custom_id']:>8}  {prompt!r} -> {bulk.summary_text(row)!r}\n")
    sys.stdout.write(
        f"\n{report.succeeded}/{report.requests} succeeded in {report.seconds:.2f}s "
        f"({report.requests_per_s:.1f} requests/s, {report.output_tokens_per_s:.1f} generated tokens/s); "
        f"results in {out}\n"
    )
    return 0 if report.failed == 0 and report.succeeded == len(lines) else 1


def run_api(args: argparse.Namespace) -> int:
    import uvicorn

    settings = load_settings()
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=args.host or settings.api.host,
        port=args.port or settings.api.port,
        workers=args.workers,
    )
    return 0


def redis_url(settings: Settings) -> str:
    """The configured Redis, else the one the `queueformer up` started from this directory runs on."""
    if settings.redis_url is not None:
        return settings.redis_url.get_secret_value()
    url = read_cluster_file(settings.data_dir).get("redis_url")
    if not url:
        raise RuntimeError(
            f"no Redis to use: start the cluster with `queueformer up` here (it records its Redis in "
            f"{cluster_file(settings.data_dir)}), or set QUEUEFORMER_REDIS_URL"
        )
    return str(url)


def _api_keys() -> ApiKeys:
    from queueformer.server.connection import connect
    from queueformer.server.tenants import ApiKeys

    settings = load_settings()
    keys = ApiKeys(connect(redis_url(settings)))
    keys.add_static([k.get_secret_value() for k in settings.api.bootstrap_keys])
    return keys


def _keys_command(run: Callable[[ApiKeys], None]) -> int:
    """Run a ``keys`` command; any failure is one plain line on stderr and exit status 1."""
    try:
        import redis

        from queueformer.server.tenants import KeyNotFound
    except ImportError as exc:
        sys.stderr.write(f"queueformer keys: needs the server extra (pip install 'queueformer[server]'): {exc}\n")
        return 1
    try:
        run(_api_keys())
    except (KeyNotFound, ValueError, RuntimeError, redis.RedisError, ValidationError) as exc:
        message = exc.args[0] if isinstance(exc, KeyNotFound) and exc.args else str(exc)
        if isinstance(exc, redis.RedisError):
            message = f"Redis did not answer: {exc}"
        elif isinstance(exc, ValidationError):
            message = f"invalid settings: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        sys.stderr.write(f"queueformer keys: {' '.join(str(message).split())}\n")
        return 1
    return 0


def create_key(args: argparse.Namespace) -> int:
    def run(keys: ApiKeys) -> None:
        sys.stdout.write(keys.create(args.tenant) + "\n")

    return _keys_command(run)


def list_keys(args: argparse.Namespace) -> int:
    def run(keys: ApiKeys) -> None:
        rows = keys.list(args.tenant)
        if args.json:
            for k in rows:
                sys.stdout.write(json.dumps(dataclasses.asdict(k)) + "\n")
            return
        sys.stdout.write(f"{'ID':<21} {'PREFIX':<8} {'TENANT':<20} {'CREATED':<20} SOURCE\n")
        for k in rows:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(k.created_at)) if k.created_at else "-"
            sys.stdout.write(f"{k.id:<21} {k.prefix or '-':<8} {k.tenant:<20} {created:<20} {k.source}\n")

    return _keys_command(run)


def revoke_key(args: argparse.Namespace) -> int:
    def run(keys: ApiKeys) -> None:
        info = keys.revoke(args.key)
        sys.stdout.write(f"revoked {info.id} of tenant {info.tenant}\n")

    return _keys_command(run)
