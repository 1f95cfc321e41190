"""Redis key names of the dashboard's data: the central token counter and the last-hour series.

Kept together (one function per key, named by its noun) so they can move with the other key names.
Workers write ``generated_tokens``; the API's upkeep samples into the series; the dashboard reads them.
"""

from __future__ import annotations

from queueformer.state import PREFIX


def generated_tokens() -> str:
    """A hash: model name -> new tokens generated for it since the counter began (workers HINCRBY at commit)."""
    return f"{PREFIX}:generated-tokens"


def queue_depth_series(queue: str) -> str:
    """A sorted set of ``"<ms>:<depth>"`` samples of one queue's length, scored by sample time."""
    return f"{PREFIX}:series:queue-depth:{queue}"


def tokens_series(model: str) -> str:
    """A sorted set of ``"<ms>:<count>"`` samples of a model's ``generated_tokens`` count, scored by time."""
    return f"{PREFIX}:series:tokens:{model}"


def series_sampler() -> str:
    """Held for one sampling interval by the API replica that samples it, so replicas do not double up."""
    return f"{PREFIX}:series:sampler"
