#!/usr/bin/env python3
"""A worker pod's preStop hook: start Celery's warm shutdown now and wait until in-flight work is done.

Kubernetes runs a preStop hook before it sends SIGTERM and counts the hook's time against the pod's
``terminationGracePeriodSeconds``. This hook sends SIGTERM to the worker itself (PID 1 in its
container), so the worker stops taking messages at once: prefetched, unstarted messages go back to
Redis for other workers, ``/readyz`` turns 503, and the jobs already running continue. It then polls
the worker's ``/metrics`` (``queueformer_worker_messages_in_flight``) and reports progress on the
worker's own stdout, so ``kubectl logs`` shows the drain, and returns when nothing is in flight, when
the worker has exited, or after ``--timeout`` seconds. The kubelet's SIGTERM that follows is ignored by
a worker already in warm shutdown.

A job still running when the grace period ends is killed with the pod; its lease stops renewing and
the message is redelivered after the visibility timeout: redone, not lost. Size
``terminationGracePeriodSeconds`` to the longest job a set runs.

Standard library only: it runs in the worker image with nothing else installed.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request

IN_FLIGHT = re.compile(r"^queueformer_worker_messages_in_flight\s+([0-9.eE+-]+)\s*$", re.MULTILINE)


def log(pid: int, message: str) -> None:
    line = f"queueformer-drain: {message}\n"
    try:
        # The kubelet keeps a hook's output to itself; the worker's stdout reaches `kubectl logs`.
        with open(f"/proc/{pid}/fd/1", "a") as out:
            out.write(line)
    except OSError:
        sys.stderr.write(line)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def in_flight(port: int) -> float | None:
    """Messages the worker is working on, or None when its health port does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError):
        return None
    match = IN_FLIGHT.search(text)
    return float(match.group(1)) if match else None


def drain(pid: int, port: int, timeout: float, interval: float) -> int:
    if not alive(pid):
        return 0
    # A container's PID 1 only receives the signals it handles; Celery handles SIGTERM (warm shutdown).
    log(pid, f"sending SIGTERM to pid {pid}: warm shutdown, no new messages, finishing in-flight work")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return 0
    deadline = time.monotonic() + timeout
    last_report = 0.0
    while alive(pid):
        count = in_flight(port) if port else None
        if count is not None and count <= 0:
            log(pid, "nothing in flight; the worker exits on its own")
            return 0
        now = time.monotonic()
        if now >= deadline:
            left = "unknown" if count is None else f"{count:g}"
            log(pid, f"{left} message(s) still in flight after {timeout:.0f}s; leaving them to SIGKILL")
            return 0
        if now - last_report >= 30:
            log(pid, f"{'unknown' if count is None else f'{count:g}'} message(s) in flight; waiting")
            last_report = now
        time.sleep(interval)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="queueformer-drain", description=__doc__.splitlines()[0])
    p.add_argument("--pid", type=int, default=1, help="the worker process (default: 1, the container's PID 1)")
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("QUEUEFORMER_WORKER__HEALTH_PORT", "0") or 0),
        help="the worker's health port (default: $QUEUEFORMER_WORKER__HEALTH_PORT; 0 = wait for exit only)",
    )
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="give up waiting after this many seconds")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    args = p.parse_args(argv)
    return drain(args.pid, args.port, args.timeout, args.interval)


if __name__ == "__main__":
    sys.exit(main())
