"""The engine's greedy pick is ``torch.argmax``: the first maximum of each row, NaN and ties included."""

from __future__ import annotations

import pytest
import torch

from workers.engine.processors import greedy


@pytest.mark.parametrize("vocab", [8192, 50257, 1000, 300, 5])  # whole blocks, an overhang, fewer than four blocks
def test_greedy_is_argmax_for_random_and_tied_rows(vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    rows = torch.randn(9, vocab, generator=g)
    assert torch.equal(greedy(rows), torch.argmax(rows, dim=-1))
    tied = torch.randint(0, 3, (9, vocab), generator=g).float()  # the maximum repeats in (nearly) every block
    assert torch.equal(greedy(tied), torch.argmax(tied, dim=-1))


def test_greedy_follows_argmax_on_the_last_column_nan_and_all_masked_rows() -> None:
    rows = torch.randn(4, 8192)
    rows[0, -1] = 100.0  # the maximum in the overhang-free last block's last column
    rows[1, 3000] = float("nan")  # argmax picks the NaN
    rows[2] = float("-inf")  # every token masked (structured output): argmax says 0
    rows[3, 128] = rows[3, 4096] = 50.0  # a tie across blocks: the first
    assert torch.equal(greedy(rows), torch.argmax(rows, dim=-1))
    assert greedy(rows).tolist()[:4] == [8191, 3000, 0, 128]
