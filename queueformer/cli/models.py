"""``models build-tiny`` and ``models list``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from queueformer.cli.common import add_connection, client
from queueformer.contract.settings import load_settings


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="tiny offline models and the registry")
    msub = p.add_subparsers(dest="models_command", required=True)
    b = msub.add_parser("build-tiny", help="build the offline tiny models (GPT-2, BERT, DistilBERT, Marian)")
    b.add_argument("dir", nargs="?", help="output directory (default: settings.models_dir)")
    b.add_argument("--force", action="store_true", help="rebuild models that already exist")
    b.set_defaults(func=build_tiny)
    ls = msub.add_parser("list", help="registered models and the live workers serving them")
    add_connection(ls)
    ls.set_defaults(func=list_models)


def build_tiny(args: argparse.Namespace) -> int:
    root = Path(args.dir) if args.dir else load_settings().resolved_models_dir
    return build_tiny_models(root, force=args.force)


def build_tiny_models(root: Path, force: bool = False, quiet: bool = False) -> int:
    """Build the tiny models under ``root`` with the worker side (torch), in its own process.

    Progress lines go to stderr; ``quiet`` leaves out the JSON report on stdout.
    """
    cmd = [sys.executable, "-m", "workers.build_tiny", str(root), *(["--force"] if force else [])]
    cmd += ["--quiet"] if quiet else []
    return subprocess.run(cmd, check=False).returncode


def list_models(args: argparse.Namespace) -> int:
    with client(args) as qf:
        for m in qf.models():
            workers = ", ".join(w["worker"] for w in m["workers"]) or "no live worker"
            sys.stdout.write(f"{m['id']:<24} {m['task']:<10} queue={m['queue']:<20} {m['quantization']:<5} {workers}\n")
    return 0
