"""Run the CPU benchmark suite: ``python -m bench [--quick] [--full] [--only NAME ...]``.

Each benchmark prints a table and writes ``bench/results/<name>.json``. The default suite runs in
about 9 minutes on 2 CPU cores with native bf16 (over 20 on AVX2-only cores, which decode in fp32);
``--quick`` is a smoke run; ``--full`` adds the other dtype and the dominated static configurations.
``bench.gpu`` runs only where CUDA is present, and ``--only structured`` (grammar libraries and the
cost of structured output, ~15 minutes) only when asked (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import bulk_generation, encoder_tasks, priority, queue_overhead, roofline
from bench.common import say

SUITE = {
    "roofline": roofline.run,
    "queue_overhead": queue_overhead.run,
    "encoder_tasks": encoder_tasks.run,
    "bulk_generation": bulk_generation.run,
    "priority": priority.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in a couple of minutes")
    parser.add_argument("--full", action="store_true", help="both dtypes, every static configuration")
    parser.add_argument("--only", nargs="+", choices=[*SUITE, "gpu", "structured"], help="run only these")
    args = parser.parse_args(argv)
    names = args.only or list(SUITE)
    started = time.perf_counter()
    for name in names:
        say(f"\n=== {name} ===")
        if name == "gpu":
            from bench import gpu

            gpu.run(quick=args.quick)
        elif name == "structured":
            from bench import structured

            structured.run(quick=args.quick)
        elif name == "bulk_generation":
            bulk_generation.run(quick=args.quick, full=args.full)
        else:
            SUITE[name](quick=args.quick)
    say(f"\nbenchmarks done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
