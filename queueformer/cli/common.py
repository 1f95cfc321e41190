"""Shared CLI plumbing: the API address and key, the cluster file ``up`` writes, and a client built from them.

``queueformer up`` writes ``<data_dir>/cluster.json`` (mode 0600): the API URL, the Redis URL it runs
on (with its password) and Flower's address and basic-auth credentials. Every command reads it when
neither a flag nor an environment variable says otherwise, so commands run next to ``up`` find the
cluster on their own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

from queueformer.client import Client

DEFAULT_URL = "http://127.0.0.1:8000"
CLUSTER_FILE = "cluster.json"


class UsageError(Exception):
    """Something the user typed cannot work as given (exit status 2): bad JSON, a missing file."""


def data_dir() -> Path:
    """Where ``up`` keeps its state (``QUEUEFORMER_DATA_DIR``, ``.env``, or ``.queueformer``)."""
    from pydantic import ValidationError

    from queueformer.contract.settings import load_settings

    try:
        return load_settings().data_dir
    except ValidationError:  # a broken setting elsewhere must not hide the cluster file
        return Path(os.environ.get("QUEUEFORMER_DATA_DIR") or ".queueformer")


def cluster_file(base: Path | None = None) -> Path:
    return (base or data_dir()) / CLUSTER_FILE


def read_cluster_file(base: Path | None = None) -> dict[str, Any]:
    """What the running ``up`` wrote, or nothing when no cluster was started from here."""
    try:
        data = json.loads(cluster_file(base).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cluster_file(base: Path, info: dict[str, Any]) -> Path:
    """Write ``info`` readable by this user only (it holds the Redis and Flower passwords)."""
    path = cluster_file(base)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    tmp.replace(path)
    return path


def normalize_url(url: str) -> str:
    """The API's base URL: the OpenAI SDK's form (ending in ``/v1``) is accepted too."""
    url = url.strip().rstrip("/")
    return re.sub(r"/v1$", "", url)


def default_url() -> str:
    return os.environ.get("QUEUEFORMER_URL") or read_cluster_file().get("url") or DEFAULT_URL


def add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=None,
        help=f"API base URL, with or without /v1 (default: $QUEUEFORMER_URL, else the cluster `queueformer up` "
        f"started from this directory, else {DEFAULT_URL})",
    )
    p.add_argument("--api-key", default=None, help="bearer API key (default: $QUEUEFORMER_API_KEY)")


def url_of(args: argparse.Namespace) -> str:
    return normalize_url(args.url or default_url())


def client(args: argparse.Namespace) -> Client:
    return Client(url_of(args), api_key=args.api_key or os.environ.get("QUEUEFORMER_API_KEY"))


def read_input(path: Path) -> bytes:
    """An input file's bytes, or a usage error that names it."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"input file {path} does not exist; give the path of a JSONL file") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory; give the path of a JSONL file") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{what} is not valid JSON ({exc.msg} at column {exc.colno}); "
            'write one JSON object, e.g. \'{"task":"generate","model":"tiny-gpt2","prompt":"Hi"}\''
        ) from None
