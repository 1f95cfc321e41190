"""Which batch lines probably share a prompt prefix: a key the API groups lines by when it cuts chunks.

A worker's decode engine prefills a prefix shared by the rows it holds once (``workers.engine.prefix``);
it can only share what reaches it. The API has no tokenizer for every model, so it compares text:
lines whose prompts begin with the same ``PREFIX_CHARS`` characters, or chats with the same turns
before the last one, get the same key. A key is a routing hint only: equal keys put lines in one
chunk; whether and how much they share is found by the engine, token by token.
"""

from __future__ import annotations

import hashlib
import json

from queueformer.contract.jobs import GenerateJob, JobBase

# Few-shot blocks and system prompts run to hundreds of characters; a shorter common start (an
# instruction like "Translate:") is cheap to prefill again and would only reorder lines for nothing.
PREFIX_CHARS = 128


def prefix_key(job: JobBase) -> str | None:
    """A digest of the part of the job's prompt that other lines may share, or None."""
    if not isinstance(job, GenerateJob):
        return None
    if job.messages is not None:
        turns = job.messages[:-1]
        if turns:
            text = json.dumps([[t.role, t.content, t.name] for t in turns], ensure_ascii=False)
        else:
            text = job.messages[0].content
            if len(text) <= PREFIX_CHARS:
                return None
            text = text[:PREFIX_CHARS]
        return "c" + hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
    if len(job.prompt) <= PREFIX_CHARS:
        return None
    return "p" + hashlib.blake2b(job.prompt[:PREFIX_CHARS].encode(), digest_size=12).hexdigest()
