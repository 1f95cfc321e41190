"""The ``queueformer`` command line: run a cluster, submit work, follow it, fetch results.

Commands that need torch (``worker``, ``models build-tiny``, ``demo``) import the worker side only
when they run, so the CLI itself stays as light as the contract.
"""

from __future__ import annotations

import argparse
import sys

from queueformer.cli import batch, cluster, jobs, models


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="queueformer", description="A job queue for Hugging Face transformer models.")
    sub = parser.add_subparsers(dest="command", required=True)
    cluster.add(sub)
    jobs.add(sub)
    batch.add(sub)
    models.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        # Hand the rest to the worker's own parser (it owns its flags and imports torch).
        from workers.main import main as worker_main

        return worker_main(argv[1:])
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
