"""The ``queueformer`` command line: run a cluster, submit work, follow it, fetch results.

The CLI stands on the contract and the SDK alone, so a base install (no Redis client, no torch) runs
it. Commands that run the server side import it when they run (``up``, ``keys``); commands that need
torch (``worker``, ``models build-tiny``) run the worker side as its own program. A failure is one or
two plain lines on stderr (``--debug`` adds the traceback): exit status 2 for usage errors, 1 for
failures at run time.
"""

from __future__ import annotations

import argparse
import os
import sys

from queueformer.cli import batch, cluster, errors, jobs, models
from queueformer.cli.common import url_of


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="queueformer",
        description="A job queue for Hugging Face transformer models.",
        epilog="--debug (anywhere on the line, or QUEUEFORMER_DEBUG=1) shows the traceback of a failure.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True)
    cluster.add(sub)
    jobs.add(sub)
    batch.add(sub)
    models.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        # The worker owns its flags and imports torch: this process becomes it.
        os.execv(sys.executable, [sys.executable, "-m", "workers.main", *argv[1:]])
    debug = "--debug" in argv or os.environ.get("QUEUEFORMER_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    subs = [str(v) for k, v in sorted(vars(args).items()) if k.endswith("_command") and k != "command" and v]
    command = " ".join([args.command, *subs])
    url = None
    try:
        url = url_of(args) if hasattr(args, "url") else None
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        sys.stderr.write(f"queueformer {command}: interrupted\n")
        return 130
    except Exception as exc:  # the one place every failure becomes plain lines
        return errors.report(exc, command, url, debug)


if __name__ == "__main__":
    sys.exit(main())
