"""The decode engine's slab cache: copies on admission and compaction keep every row's keys and values."""

from __future__ import annotations

import torch

from workers.engine.kvcache import SlabLayer


def filled(rows: int, length: int, seed: int) -> tuple[SlabLayer, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(rows, 2, length, 4, generator=g)
    v = torch.randn(rows, 2, length, 4, generator=g)
    layer = SlabLayer()
    layer.update(k, v)
    return layer, k, v


def poison(layer: SlabLayer) -> None:
    """NaN in every column after the filled span, as reused memory may hold."""
    assert layer._k is not None and layer._v is not None
    layer._k[:, :, layer.end :] = float("nan")
    layer._v[:, :, layer.end :] = float("nan")


def test_merged_rows_are_right_aligned_with_zeros_before_them_whatever_the_memory_held() -> None:
    a, ka, va = filled(3, 5, 0)
    b, kb, vb = filled(2, 2, 1)
    a.update(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))  # a slab with free room after its span
    poison(a)
    ka, va = a.keys.clone(), a.values.clone()  # type: ignore[union-attr]
    for dest in (None, [torch.tensor([4, 0, 2]), torch.tensor([3, 1])]):
        out = SlabLayer.merged([a, b], headroom=8, dest=dest)
        rows = dest[0].tolist() + dest[1].tolist() if dest else [0, 1, 2, 3, 4]
        assert out.keys is not None and out.values is not None and out.keys.shape == (5, 2, 6, 4)
        assert torch.equal(out.keys[rows[:3]], ka) and torch.equal(out.values[rows[:3]], va)
        assert torch.equal(out.keys[rows[3:], :, 4:], kb) and torch.equal(out.values[rows[3:], :, 4:], vb)
        assert not out.keys[rows[3:], :, :4].any() and not out.values[rows[3:], :, :4].any()
        out.update(torch.ones(5, 2, 1, 4), torch.ones(5, 2, 1, 4))  # the headroom takes the next column
        assert out.keys.shape == (5, 2, 7, 4) and torch.equal(out.keys[:, :, -1], torch.ones(5, 2, 4))


def test_filling_holes_moves_only_the_last_rows_and_keeps_the_room_after_the_span() -> None:
    layer, _, _ = filled(6, 5, 7)
    layer.update(torch.randn(6, 2, 1, 4), torch.randn(6, 2, 1, 4))
    layer.trim_left(1)
    keys, values = layer.keys.clone(), layer.values.clone()  # type: ignore[union-attr]
    storage = layer._k.data_ptr()  # type: ignore[union-attr]
    # rows 1 and 3 finished; of the kept rows 0, 2, 4, 5 the last two move into their places
    layer.fill_holes(torch.tensor([1, 3]), torch.tensor([4, 5]), 4)
    assert layer.keys is not None and layer.values is not None
    assert torch.equal(layer.keys, keys[[0, 4, 2, 5]]) and torch.equal(layer.values, values[[0, 4, 2, 5]])
    assert layer._k is not None and layer._k.data_ptr() == storage  # in place: nothing else was copied
    layer.update(torch.ones(4, 2, 1, 4), torch.ones(4, 2, 1, 4))
    assert layer.keys.shape == (4, 2, 6, 4) and torch.equal(layer.keys[:, :, -1], torch.ones(4, 2, 4))


def test_selecting_rows_copies_the_filled_span_and_keeps_the_room_after_it() -> None:
    layer, _, _ = filled(4, 6, 4)
    layer.update(torch.randn(4, 2, 1, 4), torch.randn(4, 2, 1, 4))
    layer.trim_left(2)  # leading columns every row had as padding
    poison(layer)
    keys, values = layer.keys.clone(), layer.values.clone()  # type: ignore[union-attr]
    capacity = layer._k.shape[2]  # type: ignore[union-attr]
    layer.batch_select_indices(torch.tensor([3, 0]))
    assert layer.keys is not None and layer.values is not None
    assert torch.equal(layer.keys, keys[[3, 0]]) and torch.equal(layer.values, values[[3, 0]])
    assert layer._k.shape[2] == capacity - 2  # type: ignore[union-attr]
    before = layer._k.data_ptr()  # type: ignore[union-attr]
    layer.update(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4))  # written in place: no regrowth
    assert layer._k.data_ptr() == before and layer.get_seq_length() == 6  # type: ignore[union-attr]


def test_a_packed_prefills_segments_become_right_aligned_rows_with_zero_padding() -> None:
    packed, k, v = filled(1, 12, 2)  # one row holding three prompts end to end: 4, 1 and 7 tokens
    rows = packed.unpacked([(0, 4), (4, 5), (5, 12)], headroom=3)
    assert rows.keys is not None and rows.values is not None
    assert rows.keys.shape == (3, 2, 7, 4)
    assert rows._k is not None and rows._k.shape[2] == 10  # room for three decode steps
    for row, (a, b) in enumerate([(0, 4), (4, 5), (5, 12)]):
        n = b - a
        assert torch.equal(rows.keys[row, :, 7 - n :], k[0, :, a:b])
        assert torch.equal(rows.values[row, :, 7 - n :], v[0, :, a:b])
        assert not rows.keys[row, :, : 7 - n].any() and not rows.values[row, :, : 7 - n].any()


def test_the_cache_goes_by_the_name_the_models_forward_takes() -> None:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from workers.engine.kvcache import cache_argument, returned_cache

    class Renamed(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, cache: object = None, **kwargs: object) -> None: ...

    class Older(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, past_key_values: object = None, **kwargs: object) -> None: ...

    assert cache_argument(Renamed()) == "cache"
    assert cache_argument(Older()) == "past_key_values"
    held = SlabLayer()
    assert returned_cache(CausalLMOutputWithPast(cache=held)) is held
    assert returned_cache({"past_key_values": held}) is held
