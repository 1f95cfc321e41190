"""Every failure of a command as one or two plain lines: what went wrong, then what to do.

Exit status 2 for what the user typed (bad JSON, a missing input file, flags argparse refuses), 1 for
everything that happened at run time (the API refused, the cluster is away). ``--debug`` (or
``QUEUEFORMER_DEBUG=1``) shows the traceback as well.
"""

from __future__ import annotations

import sys
import traceback

import httpx

from queueformer.cli.common import UsageError
from queueformer.contract.errors import QueueformerError

USAGE, RUNTIME = 2, 1

# What to do next, for the error codes a user meets first.
HINTS = {
    "model_not_found": "`queueformer models list` shows the registered models.",
    "invalid_api_key": "pass --api-key or set QUEUEFORMER_API_KEY (keys come from `queueformer keys create`).",
    "not_found": "check the id: `queueformer jobs list` and `queueformer batch list` show yours.",
    "quota_exceeded": "wait for running work to finish, or ask the operator for a larger quota.",
    "payload_too_large": "split the input into smaller files.",
    "storage_quota_exceeded": "delete old files, or ask the operator for a larger storage quota.",
    "broker_unavailable": "the cluster's Redis is away; check `queueformer up` (or the Redis it was given).",
    "storage_unavailable": "the cluster's storage is away; check its storage URL and credentials.",
}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe(exc: BaseException, url: str | None) -> tuple[str, str | None, int]:
    """(what went wrong, what to do or None, exit status) for ``exc``."""
    if isinstance(exc, UsageError):
        return str(exc), None, USAGE
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return (
            f"{url!r} is not a URL the CLI can use ({_one_line(str(exc))})",
            "pass --url http://HOST:PORT (or set QUEUEFORMER_URL).",
            USAGE,
        )
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return (
            f"cannot reach the queueformer API at {url} ({_one_line(str(exc)) or 'connection refused'})",
            "start a cluster with `queueformer up`, or pass --url (or set QUEUEFORMER_URL) to where one runs.",
            RUNTIME,
        )
    if isinstance(exc, httpx.TimeoutException):
        return f"the API at {url} did not answer in time", "check that the cluster is healthy and retry.", RUNTIME
    if isinstance(exc, httpx.HTTPError):
        return f"talking to the API at {url} failed: {_one_line(str(exc))}", "retry; --debug shows details.", RUNTIME
    if isinstance(exc, QueueformerError):
        status = exc.details.get("status_code")
        if status is None:  # raised here, before anything was sent: the input is at fault
            return exc.message, None, USAGE
        if status == 404 and (exc.code == "internal_error" or exc.message == "Not Found"):
            # A 404 without queueformer's error body: something else answered at that address.
            return (
                f"{url} answered 404 for a queueformer route; it is not a queueformer API",
                "pass the API's base URL with --url (with or without /v1), e.g. http://127.0.0.1:8000.",
                RUNTIME,
            )
        head = f"{exc.code}: {_one_line(exc.message)}" + (f" (HTTP {status})" if status else "")
        return head, HINTS.get(exc.code), RUNTIME
    if isinstance(exc, TimeoutError):
        return _one_line(str(exc)) or "timed out", "the work goes on in the cluster; check it again later.", RUNTIME
    if isinstance(exc, FileNotFoundError | IsADirectoryError | PermissionError) and exc.filename:
        return f"cannot read {exc.filename}: {exc.strerror}", "check the path and try again.", USAGE
    if isinstance(exc, OSError):
        return _one_line(str(exc)), None, RUNTIME
    return (
        f"unexpected error: {type(exc).__name__}: {_one_line(str(exc))}",
        "rerun with --debug for the traceback, and report it if it persists.",
        RUNTIME,
    )


def report(exc: BaseException, command: str, url: str | None, debug: bool) -> int:
    """Write ``exc`` for the user on stderr; return the exit status."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    what, todo, code = describe(exc, url)
    sys.stderr.write(f"queueformer {command}: {what}\n")
    if todo:
        sys.stderr.write(f"  {todo}\n")
    return code
