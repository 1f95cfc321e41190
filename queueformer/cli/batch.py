"""``run`` (bulk JSONL in, results out, with a progress bar) and ``batch`` (the OpenAI Batch API)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from queueformer import bulk
from queueformer.cli.common import UsageError, add_connection, client, read_input

RUN_FORMATS = """\
input lines (JSONL, one request per line; blank lines are skipped):
  OpenAI batch lines, exactly as OpenAI's Batch API takes them:
    {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "Hi"}]}}
    (url: /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/fill-mask, /v1/translations,
     /v1/classifications or /v1/jobs)
  plain requests, completed from --model, --task and --max-new-tokens:
    {"prompt": "The weather today"}
    {"task": "classify", "text": "I love it", "custom_id": "r1"}
    {"input": "the weather is good", "task": "translate", "model": "tiny-marian-en-de"}
    ("input" fills the task's text field; without custom_id a line is named line-N)

output (-o), one line per request in input order:
  for OpenAI batch lines: OpenAI's batch output lines
    {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}
  for plain requests: {"custom_id", "status": "ok", "response": <result>}
                  or {"custom_id", "status": "error", "error": {"code", "message"}}
Failed requests are counted by reason in a table at the end; the exit status is 1 if any failed.
"""


def add(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "run",
        help="run every request of a JSONL file and write results in input order",
        description="Run every request of a JSONL file as batches, with a progress bar, and write results in "
        "input order.",
        epilog=RUN_FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("input", type=Path, help="JSONL file of requests (formats below)")
    r.add_argument("-o", "--output", type=Path, required=True, help="JSONL file to write results to")
    r.add_argument("--model", help="model for plain lines without one")
    r.add_argument("--task", default="generate", help="task for plain lines without one (default: generate)")
    r.add_argument("--max-new-tokens", type=int, help="default max_new_tokens for generate/translate lines")
    r.add_argument("--max-lines", type=int, default=50_000, help="requests per batch (default: 50000)")
    r.add_argument("--show", type=int, default=0, help="print the first N results")
    add_connection(r)
    r.set_defaults(func=run)

    b = sub.add_parser("batch", help="OpenAI-compatible batches")
    bsub = b.add_subparsers(dest="batch_command", required=True)
    c = bsub.add_parser("create", help="upload a JSONL file of OpenAI batch lines and create a batch")
    c.add_argument("input", type=Path)
    c.add_argument("--endpoint", default=None, help="default: the url of the first line")
    c.add_argument("--webhook-url", default=None, help="POST a signed event here when the batch ends")
    add_connection(c)
    c.set_defaults(func=create)
    ls = bsub.add_parser("list", help="your batches, newest first")
    ls.add_argument("--limit", type=int, default=20, help="how many (1 to 100; default 20)")
    ls.add_argument("--after", default=None, help="start after this batch id (the previous page's last)")
    ls.add_argument("--json", action="store_true", help="one JSON object per batch")
    add_connection(ls)
    ls.set_defaults(func=list_batches)
    for name, fn, help_ in (
        ("status", status, "show a batch (status, request counts, file ids)"),
        ("wait", wait, "wait for a batch with a progress bar"),
        ("results", results, "print its output lines, then its error lines"),
        ("cancel", cancel, "cancel a batch"),
    ):
        q = bsub.add_parser(name, help=help_)
        q.add_argument("batch_id")
        add_connection(q)
        q.set_defaults(func=fn)
    rt = bsub.add_parser(
        "retry", help="re-run failed lines of a finished batch (by default those that may succeed on a new try)"
    )
    rt.add_argument("batch_id")
    pick = rt.add_mutually_exclusive_group()
    pick.add_argument("--code", action="append", dest="codes", help="re-run lines failed with this error code")
    pick.add_argument("--all", action="store_true", help="re-run every failed line, invalid requests included")
    add_connection(rt)
    rt.set_defaults(func=retry)


def _bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def _jsonl(path: Path) -> list[dict[str, Any]]:
    read_input(path)  # a missing or unreadable file is the user's to fix
    return [obj for _, obj in bulk.read_lines(path)]


def run(args: argparse.Namespace) -> int:
    objs = _jsonl(args.input)
    if not objs:
        raise UsageError(f"{args.input} has no requests; see `queueformer run --help` for the line formats")
    defaults = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    endpoint, lines = bulk.to_batch_lines(args.input, args.model, args.task, defaults)
    openai_format = all(bulk.is_openai_line(o) for o in objs)
    with client(args) as qf, _bar() as bar:
        task = bar.add_task("requests", total=len(lines))
        report = bulk.run(
            qf,
            endpoint,
            lines,
            args.output,
            max_lines=args.max_lines,
            on_progress=lambda done, total: bar.update(task, completed=done),
            openai_format=openai_format,
        )
    for line, row in list(zip(lines, report.rows, strict=False))[: args.show]:
        shown = line["body"].get("prompt") or line["body"].get("text") or line["body"].get("input") or ""
        sys.stdout.write(f"{row['custom_id']}: {shown!r} -> {bulk.summary_text(row)!r}\n")
    sys.stdout.write(
        f"{report.succeeded}/{report.requests} succeeded, {report.failed} failed in {report.seconds:.1f}s: "
        f"{report.requests_per_s:.1f} requests/s, {report.output_tokens_per_s:.1f} generated tokens/s "
        f"-> {args.output}\n"
    )
    if report.failures:
        sys.stdout.write(f"\n{'FAILED':>6}  {'REASON':<24} FIRST (custom_id: message)\n")
        for code, count in report.failures.most_common():
            sys.stdout.write(f"{count:>6}  {code:<24} {_clip(report.examples[code], 100)}\n")
    return 0 if report.failed == 0 else 1


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def create(args: argparse.Namespace) -> int:
    lines = _jsonl(args.input)
    if not lines:
        raise UsageError(f"{args.input} has no lines; a batch needs at least one")
    endpoint = args.endpoint or str(lines[0].get("url") or "/v1/jobs")
    with client(args) as qf:
        file = qf.upload(args.input, purpose="batch")
        batch = qf.create_batch(file["id"], endpoint, webhook_url=args.webhook_url)
    sys.stdout.write(json.dumps(batch, indent=2) + "\n")
    return 0


def _when(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts))) if ts else "-"


def list_batches(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 100:
        raise UsageError("--limit must be between 1 and 100")
    with client(args) as qf:
        page = qf.batches(limit=args.limit, after=args.after)
    rows = page["data"]
    if args.json:
        for b in rows:
            sys.stdout.write(json.dumps(b, ensure_ascii=False) + "\n")
        return 0
    if not rows:
        sys.stdout.write("no batches yet\n")
        return 0
    sys.stdout.write(f"{'ID':<38} {'STATUS':<12} {'DONE':>11} {'FAILED':>7} {'CREATED':<19} ENDPOINT\n")
    for b in rows:
        n = b["request_counts"]
        done = f"{n['completed'] + n['failed']}/{n['total']}"
        sys.stdout.write(
            f"{b['id']:<38} {b['status']:<12} {done:>11} {n['failed']:>7} {_when(b['created_at']):<19} "
            f"{b['endpoint']}\n"
        )
    if page.get("has_more"):
        sys.stdout.write(f"more: queueformer batch list --after {page['last_id']}\n")
    return 0


def status(args: argparse.Namespace) -> int:
    with client(args) as qf:
        sys.stdout.write(json.dumps(qf.batch(args.batch_id), indent=2) + "\n")
    return 0


def wait(args: argparse.Namespace) -> int:
    with client(args) as qf, _bar() as bar:
        task = bar.add_task(args.batch_id, total=None)

        def show(b: dict[str, Any]) -> None:
            counts = b["request_counts"]
            bar.update(task, total=counts["total"], completed=counts["completed"] + counts["failed"])

        batch = qf.wait_batch(args.batch_id, on_progress=show)
    sys.stdout.write(json.dumps(batch, indent=2) + "\n")
    return 0 if batch["status"] == "completed" else 1


def results(args: argparse.Namespace) -> int:
    with client(args) as qf:
        batch = qf.batch(args.batch_id)
        if batch["status"] in ("validating", "in_progress", "finalizing", "cancelling"):
            sys.stdout.buffer.write(qf.partial_output(args.batch_id) + qf.partial_output(args.batch_id, errors=True))
            sys.stdout.flush()
            sys.stderr.write(f"batch {args.batch_id} is {batch['status']}: these are the lines finished so far\n")
            return 0
        done, failed = qf.batch_results(batch)
    for line in [*done, *failed]:
        sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    return 0


def cancel(args: argparse.Namespace) -> int:
    with client(args) as qf:
        sys.stdout.write(json.dumps(qf.cancel_batch(args.batch_id), indent=2) + "\n")
    return 0


def retry(args: argparse.Namespace) -> int:
    with client(args) as qf:
        sys.stdout.write(json.dumps(qf.retry_batch(args.batch_id, args.codes, all_failed=args.all), indent=2) + "\n")
    return 0
