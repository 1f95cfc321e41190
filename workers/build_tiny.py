"""``python -m workers.build_tiny DIR``: build the tiny offline models (the CLI's ``models build-tiny``).

A program of its own so that the CLI, which runs on a base install, never imports torch. Models built
by the current recipe are skipped; each one built says so on stderr as it starts and ends.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from workers.tiny_models import NAMES, _built, build_all, recipe


def _say(line: str) -> None:
    sys.stderr.write(f"tiny models: {line}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="queueformer models build-tiny", description=__doc__)
    parser.add_argument("dir", type=Path, help="output directory")
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    parser.add_argument("--only", action="append", choices=NAMES, help="build only this model (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no JSON report on stdout")
    args = parser.parse_args(argv)
    names = args.only or list(NAMES)
    want = recipe()
    todo = [n for n in names if args.force or not _built(args.dir / n, want)]
    report: dict[str, Any] = {n: {"skipped": True} for n in names if n not in todo}
    try:
        for i, name in enumerate(todo, start=1):
            _say(f"[{i}/{len(todo)}] building {name} into {args.dir} (a minute or more on a small CPU) ...")
            report.update(build_all(args.dir, names=[name], force=args.force))
            _say(f"[{i}/{len(todo)}] built {name} in {report[name]['seconds']:.0f}s")
    except Exception as exc:  # a failed build is one line for the user, not a traceback
        _say(f"building into {args.dir} failed: {type(exc).__name__}: {' '.join(str(exc).split())}")
        return 1
    if not args.quiet:
        sys.stdout.write(json.dumps({"dir": str(args.dir), "models": report}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
