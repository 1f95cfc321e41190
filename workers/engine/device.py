"""Device-level facts the engines need: what an out-of-memory error looks like and how to recover."""

from __future__ import annotations

import gc

import torch


def is_oom(exc: BaseException) -> bool:
    """CUDA raises ``torch.OutOfMemoryError``; the CPU allocator raises a RuntimeError saying so."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError | MemoryError):
        text = str(exc)
        return isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()
    return False


def free_memory() -> None:
    """Return cached blocks after an OOM so the next batch starts from a clean allocator."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_stats() -> dict[str, int]:
    """Allocated and peak bytes per CUDA device (empty on CPU-only workers)."""
    if not torch.cuda.is_available():
        return {}
    out: dict[str, int] = {}
    for i in range(torch.cuda.device_count()):
        out[f"cuda:{i}.allocated"] = int(torch.cuda.memory_allocated(i))
        out[f"cuda:{i}.reserved"] = int(torch.cuda.memory_reserved(i))
        out[f"cuda:{i}.peak"] = int(torch.cuda.max_memory_allocated(i))
    return out
