"""``submit``, ``status``, ``result``, ``cancel``, ``events``: single jobs."""

from __future__ import annotations

import argparse
import json
import sys

from queueformer.cli.common import add_connection, client


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit one job (JSON body from an argument or stdin)")
    p.add_argument("job", nargs="?", help='job JSON, e.g. \'{"task":"generate","model":"tiny-gpt2","prompt":"Hi"}\'')
    p.add_argument("--wait", action="store_true", help="wait and print the result")
    p.add_argument("--idempotency-key")
    add_connection(p)
    p.set_defaults(func=submit)

    for name, fn, help_ in (
        ("status", status, "show a job"),
        ("result", result, "print a job's result"),
        ("cancel", cancel, "cancel a job"),
        ("events", events, "follow a job's events (tokens, progress, state)"),
    ):
        q = sub.add_parser(name, help=help_)
        q.add_argument("job_id")
        add_connection(q)
        q.set_defaults(func=fn)


def _print(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def submit(args: argparse.Namespace) -> int:
    body = json.loads(args.job if args.job else sys.stdin.read())
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
        _print(qf.job(args.job_id))
    return 0


def result(args: argparse.Namespace) -> int:
    with client(args) as qf:
        _print(qf.result(args.job_id))
    return 0


def cancel(args: argparse.Namespace) -> int:
    with client(args) as qf:
        _print(qf.cancel(args.job_id))
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
