"""The worker's memory limit: past it, the worker dies at once, as a container past its limit is killed.

On Kubernetes the kubelet kills a container whose memory passes its limit (OOMKilled); on one machine
(`queueformer up`) nothing would, and a runaway input pushes the host into swap or has the kernel's
OOM killer pick some process. With ``QUEUEFORMER_WORKER__MEMORY_LIMIT_MB`` set, a thread samples the
resident set every ``interval_s`` and SIGKILLs its own process past the limit, so the failure is the
same everywhere: the worker's messages are handed back (``queueformer.server.liveness``), the input
that was executing takes a strike, and one that does it again running alone is quarantined.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident set size now (Linux), or its peak where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class MemoryGuard:
    """Kills this process once its resident memory passes ``limit_mb`` (0: never)."""

    def __init__(self, limit_mb: int, interval_s: float = 0.01) -> None:
        self.limit = limit_mb * 1024 * 1024
        self.interval_s = interval_s
        self._stop = threading.Event()
        if self.limit:
            threading.Thread(target=self._loop, name="memory-guard", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            used = resident_bytes()
            if used > self.limit:
                log.critical(
                    "resident memory %d MiB passed the worker's limit of %d MiB: exiting at once",
                    used >> 20,
                    self.limit >> 20,
                )
                for handler in logging.getLogger().handlers:
                    handler.flush()
                os.kill(os.getpid(), signal.SIGKILL)
