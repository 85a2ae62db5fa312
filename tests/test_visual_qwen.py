"""Temporal merging of Qwen-VL merger outputs per temporal slot: DeepStack rows follow the merge."""
from __future__ import annotations

import torch

from dymu.tokens import MergedTokens
from dymu.visual_qwen import join_slots, reused_slots, slot_seconds, split_slots, temporal_merge


def two_slots(width: int = 8) -> tuple[MergedTokens, torch.Tensor]:
    """Two temporal slots of 4 cells. Slot 0 has rows a (cells 0, 1), b, c; slot 1 shows the same scene
    as rows a, a, b, c. DeepStack rows differ everywhere."""
    generator = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(3, width, generator=generator)
    deep = torch.randn(7, width, generator=generator)
    embeds = torch.stack([a, b, c, a, a, b, c])
    mapping = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    tokens = MergedTokens(embeds, torch.tensor([2, 1, 1, 1, 1, 1, 1]), mapping, [4, 4], deepstack=[deep],
                          meta={"grid_thw": [2, 4, 4]})
    return tokens, deep


def test_split_slots_round_trips():
    tokens, _ = two_slots()
    slots = split_slots(tokens)
    assert [s.num_positions for s in slots] == [4, 4] and [s.num_unique for s in slots] == [3, 4]
    assert torch.equal(torch.cat([s.embeds for s in slots]), tokens.embeds)


def test_static_slots_merge_and_deepstack_rows_are_size_weighted_means():
    tokens, deep = two_slots()
    merged = temporal_merge(tokens, 0.9)
    assert merged.num_unique == 3 and merged.num_positions == 8
    assert torch.equal(merged.mapping, torch.tensor([0, 0, 1, 2, 0, 0, 1, 2]))
    expected = torch.stack([(2 * deep[0] + deep[3] + deep[4]) / 4, (deep[1] + deep[5]) / 2, (deep[2] + deep[6]) / 2])
    torch.testing.assert_close(merged.deepstack[0], expected)
    assert merged.meta["grid_thw"] == [2, 4, 4]


def test_threshold_one_changes_nothing():
    tokens, deep = two_slots()
    assert temporal_merge(tokens, 1.0) is tokens


def test_slot_seconds_pair_frames_and_pad_an_odd_count():
    assert slot_seconds([0.0, 0.5, 1.0, 1.5], 2) == [0.25, 1.25]
    assert slot_seconds([0.0, 0.5, 1.0], 2) == [0.25, 1.0]


def test_reused_slots_compare_with_the_last_encoded_slot():
    base = torch.zeros(4, 6)
    drift = torch.zeros(4, 6)
    drift[2] = 0.06  # one patch drifts by 0.06 per slot: below 0.1 once, above it after two slots
    pixels = torch.cat([base, base + drift, base + 2 * drift, base + 2 * drift])
    assert reused_slots(pixels, 4, 0.1) == [0, 0, 2, 2]
    assert reused_slots(pixels, 4, 0.0) == [0, 1, 2, 3]


def test_join_slots_keeps_rows_apart():
    tokens, deep = two_slots()
    joined = join_slots([tokens, tokens])
    assert joined.num_unique == 14 and torch.equal(joined.mapping[8:], tokens.mapping + 7)
    assert torch.equal(joined.deepstack[0], torch.cat([deep, deep]))
