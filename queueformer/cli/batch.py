"""``run`` (bulk JSONL in, results out, with a progress bar) and ``batch`` (the OpenAI Batch API)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from queueformer import bulk
from queueformer.cli.common import add_connection, client


def add(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="run every request of a JSONL file and write results in input order")
    r.add_argument("input", type=Path)
    r.add_argument("-o", "--output", type=Path, required=True)
    r.add_argument("--model", help="model for plain lines without one")
    r.add_argument("--task", default="generate", help="task for plain lines without one (default: generate)")
    r.add_argument("--max-new-tokens", type=int, help="default max_new_tokens for generate/translate lines")
    r.add_argument("--max-lines", type=int, default=50_000, help="requests per batch")
    r.add_argument("--show", type=int, default=0, help="print the first N results")
    add_connection(r)
    r.set_defaults(func=run)

    b = sub.add_parser("batch", help="OpenAI-compatible batches")
    bsub = b.add_subparsers(dest="batch_command", required=True)
    c = bsub.add_parser("create", help="upload a JSONL file of batch lines and create a batch")
    c.add_argument("input", type=Path)
    c.add_argument("--endpoint", default=None, help="default: the url of the first line")
    add_connection(c)
    c.set_defaults(func=create)
    for name, fn, help_ in (
        ("wait", wait, "wait for a batch with a progress bar"),
        ("results", results, "print output lines"),
        ("cancel", cancel, "cancel a batch"),
        ("retry", retry, "re-run failed lines"),
    ):
        q = bsub.add_parser(name, help=help_)
        q.add_argument("batch_id")
        add_connection(q)
        q.set_defaults(func=fn)


def _bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def run(args: argparse.Namespace) -> int:
    defaults = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    endpoint, lines = bulk.to_batch_lines(args.input, args.model, args.task, defaults)
    with client(args) as qf, _bar() as bar:
        task = bar.add_task("requests", total=len(lines))
        report = bulk.run(
            qf,
            endpoint,
            lines,
            args.output,
            max_lines=args.max_lines,
            on_progress=lambda done, total: bar.update(task, completed=done),
        )
    if args.show:
        rows = [json.loads(x) for x in args.output.read_text("utf-8").splitlines()[: args.show]]
        for line, row in zip(lines, rows, strict=False):
            shown = line["body"].get("prompt") or line["body"].get("text") or line["body"].get("input") or ""
            sys.stdout.write(f"{row['custom_id']}: {shown!r} -> {bulk.summary_text(row)!r}\n")
    sys.stdout.write(
        f"{report.succeeded}/{report.requests} succeeded, {report.failed} failed in {report.seconds:.1f}s: "
        f"{report.requests_per_s:.1f} requests/s, {report.output_tokens_per_s:.1f} generated tokens/s "
        f"-> {args.output}\n"
    )
    return 0 if report.failed == 0 else 1


def create(args: argparse.Namespace) -> int:
    lines = [json.loads(x) for x in args.input.read_text("utf-8").splitlines() if x.strip()]
    endpoint = args.endpoint or (lines[0]["url"] if lines else "/v1/jobs")
    with client(args) as qf:
        file = qf.upload(args.input, purpose="batch")
        sys.stdout.write(json.dumps(qf.create_batch(file["id"], endpoint), indent=2) + "\n")
    return 0


def wait(args: argparse.Namespace) -> int:
    with client(args) as qf, _bar() as bar:
        task = bar.add_task(args.batch_id, total=None)

        def show(b: dict[str, object]) -> None:
            counts = b["request_counts"]
            assert isinstance(counts, dict)
            bar.update(task, total=counts["total"], completed=counts["completed"] + counts["failed"])

        batch = qf.wait_batch(args.batch_id, on_progress=show)
    sys.stdout.write(json.dumps(batch, indent=2) + "\n")
    return 0 if batch["status"] == "completed" else 1


def results(args: argparse.Namespace) -> int:
    with client(args) as qf:
        out, err = qf.batch_results(qf.batch(args.batch_id))
    for line in [*out, *err]:
        sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    return 0


def cancel(args: argparse.Namespace) -> int:
    with client(args) as qf:
        sys.stdout.write(json.dumps(qf.cancel_batch(args.batch_id), indent=2) + "\n")
    return 0


def retry(args: argparse.Namespace) -> int:
    with client(args) as qf:
        sys.stdout.write(json.dumps(qf.retry_batch(args.batch_id), indent=2) + "\n")
    return 0
