"""The ``queueformer`` command line: run a cluster, submit work, follow it, fetch results.

The CLI stands on the contract and the SDK alone, so a base install (no Redis client, no torch) runs
it. Commands that run the server side import it when they run (``up``, ``keys``); commands that need
torch (``worker``, ``models build-tiny``) run the worker side as its own program.
"""

from __future__ import annotations

import argparse
import os
import sys

from queueformer.cli import batch, cluster, jobs, models, tenants


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="queueformer", description="A job queue for Hugging Face transformer models.")
    sub = parser.add_subparsers(dest="command", required=True)
    cluster.add(sub)
    jobs.add(sub)
    batch.add(sub)
    models.add(sub)
    tenants.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        # The worker owns its flags and imports torch: this process becomes it.
        os.execv(sys.executable, [sys.executable, "-m", "workers.main", *argv[1:]])
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
