"""Temporal merging on synthetic per-frame tokens (no model needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dymu.errors import DymuError
from dymu.frames import read_video_frames
from dymu.temporal import calibrate_temporal_threshold, concatenate_frames, match_previous, merge_frames
from dymu.tokens import InvalidTokens, MergedTokens
from tests import media

POSITIONS, WIDTH = 64, 16


def one_frame(embeds: torch.Tensor, mapping: torch.Tensor | None = None, timestamp: float = 0.0) -> MergedTokens:
    mapping = torch.arange(embeds.shape[0]) if mapping is None else mapping
    return MergedTokens(
        embeds=embeds,
        sizes=torch.bincount(mapping, minlength=embeds.shape[0]),
        mapping=mapping,
        positions_per_frame=[mapping.numel()],
        timestamps=[timestamp],
        config_hash="cfg",
    )


def dtome_like_frame(features: torch.Tensor, generator: torch.Generator) -> MergedTokens:
    """Per-frame tokens as DToMe leaves them: random groups of neighbouring positions share a row (their mean)."""
    starts = torch.rand(features.shape[0], generator=generator) < 0.5
    starts[0] = True
    mapping = torch.cumsum(starts, 0) - 1
    rows = int(mapping.max()) + 1
    sizes = torch.bincount(mapping, minlength=rows)
    embeds = torch.zeros(rows, features.shape[1]).index_add_(0, mapping, features) / sizes.unsqueeze(1)
    return one_frame(embeds, mapping)


def static_frames(num_frames: int = 8, noise: float = 0.02, seed: int = 0) -> list[MergedTokens]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(POSITIONS, WIDTH, generator=g)
    return [
        one_frame(base + noise * torch.randn(POSITIONS, WIDTH, generator=g), timestamp=0.5 * f)
        for f in range(num_frames)
    ]


def changing_frames(num_frames: int = 8, seed: int = 1) -> list[MergedTokens]:
    g = torch.Generator().manual_seed(seed)
    return [one_frame(torch.randn(POSITIONS, WIDTH, generator=g), timestamp=0.5 * f) for f in range(num_frames)]


def test_threshold_one_is_plain_concatenation():
    g = torch.Generator().manual_seed(2)
    frames = [dtome_like_frame(torch.randn(POSITIONS, WIDTH, generator=g), g) for _ in range(4)]
    frames += static_frames(3)  # identical-looking frames must not merge either
    for threshold in (1.0, 1.5):
        merged = merge_frames(frames, threshold).validate()
        offsets = torch.tensor([0] + [f.num_unique for f in frames]).cumsum(0)
        assert torch.equal(merged.embeds, torch.cat([f.embeds for f in frames]))
        assert torch.equal(merged.sizes, torch.cat([f.sizes for f in frames]))
        assert torch.equal(merged.mapping, torch.cat([f.mapping + o for f, o in zip(frames, offsets)]))
        assert merged.positions_per_frame == [f.num_positions for f in frames]
        assert merged.timestamps == [f.timestamps[0] for f in frames]


def test_merging_path_without_merges_matches_concatenation():
    frames = changing_frames()
    merged = merge_frames(frames, 0.999)
    plain = concatenate_frames(frames)
    assert torch.equal(merged.embeds, plain.embeds) and torch.equal(merged.mapping, plain.mapping)


def test_static_sequence_collapses_to_one_frame():
    frames = static_frames(num_frames=8)
    merged = merge_frames(frames, 0.9).validate()
    assert merged.num_unique == POSITIONS  # about one frame's rows (here exactly)
    assert merged.rows_per_frame() == [POSITIONS] + [0] * 7
    # Each row is the size-weighted mean of the 8 noisy copies it stands for.
    expected = torch.stack([f.embeds for f in frames]).mean(0)
    torch.testing.assert_close(merged.embeds, expected, rtol=1e-5, atol=1e-5)
    assert merged.sizes.tolist() == [8] * POSITIONS


def test_static_dtome_frames_collapse_to_about_one_frame():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(POSITIONS, WIDTH, generator=g)
    # Smooth content so that positions DToMe grouped differently in two frames still look alike.
    base = torch.cumsum(base, 0) / 4
    frames = [dtome_like_frame(base + 0.01 * torch.randn(POSITIONS, WIDTH, generator=g), g) for _ in range(8)]
    per_frame = sum(f.num_unique for f in frames) / len(frames)
    merged = merge_frames(frames, 0.8).validate()
    assert merged.num_unique < 1.2 * per_frame  # of 8 frames' worth


def test_changing_sequence_barely_merges():
    frames = changing_frames()
    merged = merge_frames(frames, 0.8).validate()
    assert merged.num_unique >= 0.97 * len(frames) * POSITIONS


def test_merged_row_spans_several_frames():
    merged = merge_frames(static_frames(num_frames=5), 0.9).validate()
    frame_of = merged.frame_of_position()
    frames_per_row = [torch.unique(frame_of[merged.mapping == row]).numel() for row in range(merged.num_unique)]
    assert max(frames_per_row) == 5


@pytest.mark.parametrize("spatial", [True, False])
def test_each_frame_is_compared_with_the_one_just_before(spatial):
    """[A, A, B, B], a cut between the pairs: the new rows per frame are [P, 0, P, 0], and frame 3 reuses
    frame 2's rows (compared with frame 1, two back, it would keep all its rows)."""
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(POSITIONS, WIDTH, generator=g) for _ in range(2))
    frames = [one_frame(x + 0.01 * torch.randn(POSITIONS, WIDTH, generator=g), timestamp=0.5 * f)
              for f, x in enumerate([a, a, b, b])]
    merged = merge_frames(frames, 0.9, spatial=spatial).validate()
    assert merged.rows_per_frame() == [POSITIONS, 0, POSITIONS, 0]
    per_frame = merged.mapping.view(4, POSITIONS)
    assert torch.equal(per_frame[1], per_frame[0]) and torch.equal(per_frame[3], per_frame[2])


def test_partial_change_keeps_changed_rows():
    frames = static_frames(num_frames=2, noise=0.0)
    g = torch.Generator().manual_seed(4)
    changed = frames[1].embeds.clone()
    changed[:10] = torch.randn(10, WIDTH, generator=g)
    frames[1] = one_frame(changed, timestamp=0.5)
    merged = merge_frames(frames, 0.9).validate()
    assert merged.num_unique == POSITIONS + 10
    assert merged.rows_per_frame() == [POSITIONS, 10]


def test_spatial_overlap_restricts_candidates():
    g = torch.Generator().manual_seed(5)
    first = torch.randn(POSITIONS, WIDTH, generator=g)
    shifted = torch.roll(first, 1, dims=0)  # the same content, each at another position
    frames = [one_frame(first), one_frame(shifted)]
    assert merge_frames(frames, 0.9).num_unique == 2 * POSITIONS
    assert merge_frames(frames, 0.9, spatial=False).validate().num_unique == POSITIONS


def test_a_previous_row_absorbs_every_new_row_that_matches_it():
    # Frame 1 splits what frame 0 had as one row (DToMe grouped differently): both halves merge back.
    frame0 = one_frame(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 0, 1]))
    frame1 = one_frame(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0]]), torch.tensor([0, 1, 1, 2]))
    merged = merge_frames([frame0, frame1], 0.9).validate()
    assert merged.num_unique == 2 and merged.mapping.tolist() == [0, 0, 0, 1, 0, 0, 0, 1]
    assert merged.sizes.tolist() == [6, 2]
    expected = (3 * torch.tensor([1.0, 0.0]) + torch.tensor([1.0, 0.1]) + 2 * torch.tensor([1.0, -0.1])) / 6
    torch.testing.assert_close(merged.embeds[0], expected)


def test_match_previous_scores():
    prev = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    new = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    score, best = match_previous(prev, torch.tensor([0, 1, 1]), new, torch.tensor([1, 0, 2]), spatial=False)
    assert best.tolist() == [0, 1, 0] and score[:2].tolist() == [1.0, 1.0]
    # Spatially, new row 0 covers position 1, where the previous frame had row 1 only.
    score, best = match_previous(prev, torch.tensor([0, 1, 1]), new, torch.tensor([1, 0, 2]), spatial=True)
    assert best.tolist() == [1, 0, 1] and score.tolist() == pytest.approx([0.0, 0.0, 2**-0.5])


def test_dtype_and_device_follow_the_input():
    frames = [f.to(dtype=torch.bfloat16) for f in static_frames(num_frames=4)]
    merged = merge_frames(frames, 0.9).validate()
    assert merged.embeds.dtype == torch.bfloat16 and merged.embeds.device == frames[0].embeds.device
    assert merged.num_unique == POSITIONS
    assert merged.sizes.dtype == frames[0].sizes.dtype


def test_round_trips_through_bytes():
    merged = merge_frames(static_frames(num_frames=3), 0.9)
    back = MergedTokens.from_bytes(merged.to_bytes())
    assert torch.equal(back.mapping, merged.mapping) and back.meta["temporal_threshold"] == pytest.approx(0.9)


@pytest.mark.parametrize("keep_fraction", [0.2, 0.5, 0.8])
def test_calibration_hits_its_target(keep_fraction):
    g = torch.Generator().manual_seed(6)
    current = torch.randn(POSITIONS, WIDTH, generator=g)
    frames = []
    for f in range(12):  # a scene where about a third of the patches change each frame
        changed = torch.rand(POSITIONS, 1, generator=g) < 0.35
        current = torch.where(changed, torch.randn(POSITIONS, WIDTH, generator=g), current)
        frames.append(dtome_like_frame(current + 0.05 * torch.randn(POSITIONS, WIDTH, generator=g), g))
    threshold = calibrate_temporal_threshold(frames, keep_fraction)
    rows = sum(f.num_unique for f in frames)
    kept = merge_frames(frames, threshold).num_unique / rows
    assert kept == pytest.approx(keep_fraction, abs=0.03)
    # Several videos at once pool their matches.
    assert calibrate_temporal_threshold([frames, frames], keep_fraction) == pytest.approx(threshold, abs=0.05)


def test_calibration_limits():
    frames = static_frames(num_frames=4)
    assert calibrate_temporal_threshold(frames, 1.0) == 1.0
    assert calibrate_temporal_threshold(frames, 0.1) == -1.0  # below one frame's rows: merge all it can
    with pytest.raises(DymuError):
        calibrate_temporal_threshold(frames, 0.0)


def test_rejects_mismatched_frames():
    frames = static_frames(num_frames=2)
    with pytest.raises(InvalidTokens):
        merge_frames([], 0.9)
    with pytest.raises(InvalidTokens, match="embedding width"):
        merge_frames([frames[0], one_frame(torch.randn(POSITIONS, WIDTH + 1))], 0.9)
    two_frames = concatenate_frames(frames)
    with pytest.raises(InvalidTokens, match="one frame"):
        merge_frames([two_frames, frames[0]], 0.9)


def _pixel_patch_tokens(frames: np.ndarray, patch: int = 8) -> list[MergedTokens]:
    """Per-frame tokens from decoded pixels: each 8x8 patch (minus the frame's mean colour) is a row."""
    t, h, w, _ = frames.shape
    pixels = torch.from_numpy(frames).float()
    pixels = pixels - pixels.mean(dim=(1, 2), keepdim=True)
    patches = pixels.reshape(t, h // patch, patch, w // patch, patch, 3).permute(0, 1, 3, 2, 4, 5)
    return [one_frame(p.reshape(-1, patch * patch * 3)) for p in patches]


def test_decoded_static_video_costs_less_than_a_changing_one(tmp_path):
    static = read_video_frames(media.static_video(tmp_path / "static.mp4", num_frames=8), num_frames=8)
    changing = read_video_frames(media.changing_video(tmp_path / "changing.mp4", num_frames=8), num_frames=8)
    static_rows = merge_frames(_pixel_patch_tokens(static.frames), 0.9).num_unique
    changing_rows = merge_frames(_pixel_patch_tokens(changing.frames), 0.9).num_unique
    assert static_rows == POSITIONS  # 64x64 px in 8x8 patches: one frame's worth
    assert changing_rows > 0.9 * 8 * POSITIONS
