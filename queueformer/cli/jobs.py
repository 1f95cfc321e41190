"""``submit``, ``status``, ``result``, ``cancel``, ``events`` and ``jobs list``: single jobs."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from queueformer.cli.common import UsageError, add_connection, client, parse_json


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit one job (JSON body from an argument or stdin)")
    p.add_argument("job", nargs="?", help='job JSON, e.g. \'{"task":"generate","model":"tiny-gpt2","prompt":"Hi"}\'')
    p.add_argument("--wait", action="store_true", help="wait and print the result")
    p.add_argument("--idempotency-key")
    add_connection(p)
    p.set_defaults(func=submit)

    for name, fn, help_ in (
        ("status", status, "show a job (or, given a batch_... id, a batch)"),
        ("result", result, "print a job's result"),
        ("cancel", cancel, "cancel a job"),
        ("events", events, "follow a job's events (tokens, progress, state)"),
    ):
        q = sub.add_parser(name, help=help_)
        q.add_argument("job_id")
        add_connection(q)
        q.set_defaults(func=fn)

    j = sub.add_parser("jobs", help="your jobs")
    jsub = j.add_subparsers(dest="jobs_command", required=True)
    ls = jsub.add_parser("list", help="your most recent jobs, newest first")
    ls.add_argument("--limit", type=int, default=20, help="how many (1 to 100; default 20)")
    ls.add_argument("--json", action="store_true", help="one JSON object per job")
    add_connection(ls)
    ls.set_defaults(func=list_jobs)


def _print(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def submit(args: argparse.Namespace) -> int:
    text = args.job if args.job else sys.stdin.read()
    if not text.strip():
        raise UsageError("no job given: pass its JSON as an argument or on stdin")
    body = parse_json(text, "the job")
    if not isinstance(body, dict):
        raise UsageError(
            'the job must be one JSON object, e.g. \'{"task":"generate","model":"tiny-gpt2","prompt":"Hi"}\''
        )
    with client(args) as qf:
        job_id = qf.submit(body, idempotency_key=args.idempotency_key)
        if not args.wait:
            _print({"id": job_id})
            return 0
        record = qf.wait(job_id)
        _print(qf.result(job_id) if record["state"] == "succeeded" else record)
        return 0 if record["state"] == "succeeded" else 1


def status(args: argparse.Namespace) -> int:
    with client(args) as qf:
        _print(qf.batch(args.job_id) if args.job_id.startswith("batch_") else qf.job(args.job_id))
    return 0


def result(args: argparse.Namespace) -> int:
    with client(args) as qf:
        _print(qf.result(args.job_id))
    return 0


def cancel(args: argparse.Namespace) -> int:
    with client(args) as qf:
        _print(qf.cancel_batch(args.job_id) if args.job_id.startswith("batch_") else qf.cancel(args.job_id))
    return 0


def events(args: argparse.Namespace) -> int:
    with client(args) as qf:
        for kind, data in qf.events(args.job_id):
            if kind == "token":
                sys.stdout.write(data["text"])
                sys.stdout.flush()
            else:
                sys.stdout.write(f"\n[{kind}] {json.dumps(data)}\n")
    return 0


def _when(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts))) if ts else "-"


def list_jobs(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 100:
        raise UsageError("--limit must be between 1 and 100")
    with client(args) as qf:
        rows = qf.jobs(limit=args.limit)
    if args.json:
        for r in rows:
            sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")
        return 0
    if not rows:
        sys.stdout.write("no jobs yet\n")
        return 0
    sys.stdout.write(f"{'ID':<34} {'TASK':<10} {'MODEL':<20} {'STATE':<10} {'CREATED':<19} ERROR\n")
    for r in rows:
        err = (r.get("error") or {}).get("code") or ""
        sys.stdout.write(
            f"{r['id']:<34} {r['task']:<10} {r['model']:<20} {r['state']:<10} {_when(r['created_at']):<19} {err}\n"
        )
    return 0
