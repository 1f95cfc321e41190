"""The decode engine's attention gives SDPA's answer while skipping each row run's left padding, and
attends within each prompt of a packed prefill.

Decode steps on a CPU run as grouped matmuls (query heads stacked on their shared key/value head), so
the checks cover grouped-query heads, keys read as strided views of a preallocated slab, and bfloat16.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from workers.engine import attention
from workers.engine.attention import DECODE_ROWS_PER_CALL, _row_spans, engine_sdpa, take_packed_calls


class _Attention(torch.nn.Module):
    is_causal = True

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.num_key_value_groups = groups


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


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("rows", [5, 100])  # one partial run; three full runs and a partial one
def test_decode_attention_equals_sdpa_for_mixed_lengths(heads: int, kv_heads: int, rows: int) -> None:
    torch.manual_seed(0)
    dim, width = 16, 90
    mask = left_padded(sorted(torch.randint(1, width, (rows,)).tolist(), reverse=True), width)
    query = torch.randn(rows, heads, 1, dim)
    # keys and values as the engine's slab hands them over: views of a wider buffer
    slab = torch.randn(2, rows, kv_heads, width + 24, dim)
    key, value = slab[:, :, :, 8 : 8 + width].unbind(0)
    module = _Attention(heads // kv_heads)
    want = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)[0]
    got = engine_sdpa(module, query, key, value, mask, scaling=0.3)[0]
    assert got.shape == (rows, 1, heads, dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_decode_attention_in_bfloat16_matches_sdpa_within_bfloat16_rounding() -> None:
    torch.manual_seed(1)
    rows, heads, kv_heads, dim, width = 70, 8, 2, 32, 50
    mask = left_padded(torch.randint(1, width, (rows,)).tolist(), width)
    query = torch.randn(rows, heads, 1, dim, dtype=torch.bfloat16)
    key, value = torch.randn(2, rows, kv_heads, width, dim, dtype=torch.bfloat16).unbind(0)
    module = _Attention(heads // kv_heads)
    want = sdpa_attention_forward(module, query, key, value, mask)[0]
    got = engine_sdpa(module, query, key, value, mask)[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_unused_padding_columns_are_never_read() -> None:
    torch.manual_seed(0)
    rows, heads, dim, width = 100, 4, 16, 90
    mask = left_padded(sorted(torch.randint(1, width, (rows,)).tolist()), width)
    query = torch.randn(rows, heads, 1, dim)
    key, value = torch.randn(2, rows, heads, width, dim).unbind(0)
    module = _Attention()
    want = sdpa_attention_forward(module, query, key, value, mask)[0]

    # Columns a whole run leaves unused are never read: garbage there (NaN) would poison SDPA's sum.
    for first, end, column in _row_spans(mask, DECODE_ROWS_PER_CALL):
        value[first:end, :, :column] = float("nan")
    got = engine_sdpa(module, query, key, value, mask)[0]
    assert torch.isnan(sdpa_attention_forward(module, query, key, value, mask)[0]).any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2)])
def test_a_packed_prefill_attends_within_each_prompt_as_if_alone(heads: int, kv_heads: int) -> None:
    torch.manual_seed(2)
    lengths, dim = [5, 1, 17, 9], 16
    bounds = [0, 5, 6, 23, 32]
    query = torch.randn(1, heads, sum(lengths), dim)
    key, value = torch.randn(2, 1, kv_heads, sum(lengths), dim).unbind(0)
    module = _Attention(heads // kv_heads)
    take_packed_calls()
    cu = torch.tensor(bounds, dtype=torch.int32)
    got = engine_sdpa(module, query, key, value, None, scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu)[0]
    assert take_packed_calls() == 1
    assert got.shape == (1, sum(lengths), heads, dim)
    for a, b in itertools.pairwise(bounds):
        alone = sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, scaling=0.3, is_causal=True
        )[0]
        torch.testing.assert_close(got[:, a:b], alone, rtol=0, atol=0)


def test_bounds_that_do_not_fit_the_call_are_not_counted_as_honoured() -> None:
    query = torch.randn(2, 4, 6, 16)  # two rows: not one packed sequence
    key, value = torch.randn(2, 2, 4, 6, 16).unbind(0)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    take_packed_calls()
    engine_sdpa(_Attention(), query, key, value, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert take_packed_calls() == 0


def test_a_decode_steps_runs_are_planned_once_and_shared_by_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    rows, heads, dim, width = 70, 4, 16, 40
    mask = left_padded(torch.randint(1, width, (rows,)).tolist(), width)
    query = torch.randn(rows, heads, 1, dim)
    module = _Attention()
    layers = [torch.randn(2, rows, heads, width, dim).unbind(0) for _ in range(3)]
    plans: list[torch.Tensor] = []

    def counted(m: torch.Tensor, n: int) -> list[tuple[int, int, int]]:
        plans.append(m)
        return _row_spans(m, n)

    monkeypatch.setattr(attention, "_row_spans", counted)
    outs = [engine_sdpa(module, query, k, v, mask)[0] for k, v in layers]
    assert len(plans) == 1  # one plan for the step's three layers
    engine_sdpa(module, query, *layers[0], mask.clone())  # the next step's mask: planned anew
    assert len(plans) == 2
    for (k, v), got in zip(layers, outs, strict=True):
        torch.testing.assert_close(got, sdpa_attention_forward(module, query, k, v, mask)[0], rtol=1e-5, atol=1e-6)
