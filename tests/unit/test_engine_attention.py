"""The decode engine's attention gives SDPA's answer while skipping each row run's left padding."""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from workers.engine.kvcache import DECODE_ROWS_PER_CALL, _row_spans, engine_sdpa


class _Attention(torch.nn.Module):
    is_causal = True


def left_padded(lengths: list[int], width: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), 1, 1, width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, 0, 0, width - n :] = True
    return mask


def test_spans_start_at_the_first_column_any_of_their_rows_uses() -> None:
    lengths = sorted(range(10, 10 + 3 * DECODE_ROWS_PER_CALL))  # three runs, shortest first
    width = max(lengths) + 4
    spans = _row_spans(left_padded(lengths, width), DECODE_ROWS_PER_CALL)
    rows = DECODE_ROWS_PER_CALL
    assert spans == [(i * rows, (i + 1) * rows, width - lengths[(i + 1) * rows - 1]) for i in range(3)]


def test_decode_attention_equals_sdpa_for_mixed_lengths() -> None:
    torch.manual_seed(0)
    rows, heads, dim, width = 100, 4, 16, 90  # 100 rows: the last run is a partial one
    mask = left_padded(sorted(torch.randint(1, width, (rows,)).tolist()), width)
    query = torch.randn(rows, heads, 1, dim)
    key, value = torch.randn(2, rows, heads, width, dim).unbind(0)
    module = _Attention()
    want = sdpa_attention_forward(module, query, key, value, mask)[0]
    torch.testing.assert_close(engine_sdpa(module, query, key, value, mask)[0], want, rtol=1e-5, atol=1e-6)

    # Columns a whole run leaves unused are never read: garbage there (NaN) would poison SDPA's sum.
    for first, end, column in _row_spans(mask, DECODE_ROWS_PER_CALL):
        value[first:end, :, :column] = float("nan")
    got = engine_sdpa(module, query, key, value, mask)[0]
    assert torch.isnan(sdpa_attention_forward(module, query, key, value, mask)[0]).any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
