"""Object ids: ``job-…``, ``file-…``, ``batch_…`` (OpenAI's spelling for batches), letters and digits only."""

from __future__ import annotations

import re
import uuid

_ID_RE = re.compile(r"^[a-z]+[-_][A-Za-z0-9]{8,64}$")


def new_id(prefix: str) -> str:
    sep = "_" if prefix == "batch" else "-"
    return f"{prefix}{sep}{uuid.uuid4().hex}"


def valid_object_id(value: str) -> bool:
    """Object ids hold letters and digits only after their prefix, so they never escape a storage prefix."""
    return bool(_ID_RE.fullmatch(value))
