"""Training data: JSONL lines read from storage, tokenized and packed into fixed-size causal-LM blocks.

Lines hold ``text``, or ``prompt`` and ``completion`` (joined). Documents are separated by the EOS token,
concatenated and cut into ``block_size`` blocks whose labels are their inputs (the ``group_texts`` of
the Hugging Face language-modeling examples); a corpus shorter than one block becomes one short block.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import IO, Any

import torch
from torch.utils.data import Dataset

from queueformer.contract.errors import InvalidInput

MAX_BAD_LINES_SHOWN = 5


def read_texts(fh: IO[bytes]) -> list[str]:
    """Every document of a JSONL training file; bad lines are reported together, by line number."""
    texts: list[str] = []
    bad: list[str] = []
    for number, raw in enumerate(fh, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError:  # malformed, not UTF-8, or an integer past Python's 4,300-digit conversion limit
            bad.append(f"line {number}: not valid JSON")
            continue
        except RecursionError:
            bad.append(f"line {number}: nested too deeply to parse")
            continue
        text = _text_of(row)
        if text is None:
            bad.append(f"line {number}: needs a string 'text', or 'prompt' and 'completion'")
        else:
            texts.append(text)
    if bad:
        shown = "; ".join(bad[:MAX_BAD_LINES_SHOWN])
        more = f" (and {len(bad) - MAX_BAD_LINES_SHOWN} more)" if len(bad) > MAX_BAD_LINES_SHOWN else ""
        raise InvalidInput(f"training file has {len(bad)} bad lines: {shown}{more}", param="training_file")
    if not texts:
        raise InvalidInput("training file holds no documents", param="training_file")
    return texts


def _text_of(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("text"), str):
        return str(row["text"])
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt + completion
    return None


def pack(tokenizer: Any, texts: list[str], block_size: int) -> list[list[int]]:
    """Tokenize, join with EOS and cut into blocks (remainder dropped once there is at least one block)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    if len(stream) < 2:
        raise InvalidInput("training data tokenizes to fewer than two tokens", param="training_file")
    if len(stream) < block_size:
        return [stream]
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def split(blocks: list[list[int]], eval_fraction: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Hold out a seeded random ``eval_fraction`` of the blocks (at least one when asked for any)."""
    if eval_fraction <= 0 or len(blocks) < 2:
        return blocks, []
    order = list(range(len(blocks)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(blocks) * eval_fraction))
    held = set(order[:n_eval])
    return [b for i, b in enumerate(blocks) if i not in held], [b for i, b in enumerate(blocks) if i in held]


@dataclass
class Blocks(Dataset[dict[str, torch.Tensor]]):
    """Equal-length blocks; each item's labels are its input ids (the model shifts them)."""

    blocks: list[list[int]]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.blocks[i], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    @property
    def tokens(self) -> int:
        return sum(len(b) for b in self.blocks)
