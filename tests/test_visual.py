"""Frame reuse: a frame that did not change since the last encoded one skips the encoder."""
from __future__ import annotations

import torch

from dymu.visual import patch_change, reused_frames


def _frames(count: int, seed: int = 0) -> torch.Tensor:
    base = torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(seed))
    noise = torch.randn(count, 3, 56, 56, generator=torch.Generator().manual_seed(seed + 1)) * 0.01
    return base + noise


def test_a_static_sequence_reuses_its_first_frame():
    assert reused_frames(_frames(6), threshold=0.05) == [0, 0, 0, 0, 0, 0]


def test_a_change_in_one_patch_is_enough_to_encode_again():
    frames = _frames(5)
    frames[3:, :, 14:28, 28:42] += 0.5  # one 14x14 patch changes from frame 3 on
    assert patch_change(frames[3], frames[0], 14) > 0.4
    assert reused_frames(frames, threshold=0.05) == [0, 0, 0, 3, 3]


def test_a_slow_drift_is_measured_against_the_last_encoded_frame():
    frames = _frames(8)
    frames += torch.arange(8).view(8, 1, 1, 1) * 0.02  # each step small, the sum not
    source = reused_frames(frames, threshold=0.05)
    assert source[1] == 0 and len(set(source)) >= 3


def test_threshold_zero_encodes_every_frame():
    assert reused_frames(_frames(4), threshold=0.0) == [0, 1, 2, 3]
