"""``python -m workers.build_tiny DIR``: build the tiny offline models (the CLI's ``models build-tiny``).

A program of its own so that the CLI, which runs on a base install, never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from workers.tiny_models import COMPLETE, NAMES, build_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="queueformer models build-tiny", description=__doc__)
    parser.add_argument("dir", type=Path, help="output directory")
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    args = parser.parse_args(argv)
    todo = [n for n in NAMES if args.force or not (args.dir / n / COMPLETE).exists()]
    if todo:
        sys.stderr.write(f"building tiny models {', '.join(todo)} into {args.dir} (minutes on a small CPU)\n")
        sys.stderr.flush()
    report = build_all(args.dir, force=args.force)
    sys.stdout.write(json.dumps({"dir": str(args.dir), "models": report}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
