"""Images and video frames as Qwen2.5-VL / Qwen3-VL expect them, prepared by the model's own processor.

- Dynamic resolution: the processor rounds each side to the patch x merge grid (28 px / 32 px) within its
  min/max pixel budgets; nothing here resizes on its own.
- Frame sampling by fps, as ``qwen-vl-utils`` does: ``duration * fps`` frames, clamped to
  [min_frames, max_frames] and to the video's length, rounded down to an even count (two frames per
  temporal slot; a one-frame video gives its frame, repeated into one slot), spread evenly over the
  video (``qwen_frame_count`` + ``dymu.frames.read_video_frames``).
- Times: a temporal slot lasts ``2 / sampled_fps`` seconds (Qwen2.5-VL's ``second_per_grid_ts``) and sits at
  the mean time of its two frames (Qwen3-VL's text timestamps).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from dymu.errors import DymuError
from dymu.frames import probe_video, read_video_frames

# qwen-vl-utils' defaults (FPS, FPS_MIN_FRAMES, FPS_MAX_FRAMES, FRAME_FACTOR).
QWEN_FPS = 2.0
QWEN_MIN_FRAMES = 4
QWEN_MAX_FRAMES = 768
FRAMES_PER_SLOT = 2


@dataclass
class QwenVisualInput:
    """What a Qwen vision encoder reads: the processor's flat patches and grid, plus the time of each slot.

    pixel_values: (sum t*h*w, C * 2 * p * p) patches; grid_thw: (n, 3) per image / video.
    seconds_per_slot, slot_timestamps: one entry per image / video (0.0 and [] for images).
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    seconds_per_slot: list[float] = field(default_factory=list)
    slot_timestamps: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.grid_thw.shape[0])

    def __getitem__(self, entries: slice) -> "QwenVisualInput":
        """Some of the entries (a slice), with their patches: batches for calibration."""
        if not isinstance(entries, slice):
            raise DymuError("a QwenVisualInput is sliced by entries, e.g. inputs[0:8]")
        starts = torch.cat([torch.zeros(1, dtype=torch.long), self.grid_thw.prod(-1).cumsum(0)]).tolist()
        first, stop, step = entries.indices(len(self))
        if step != 1:
            raise DymuError("a QwenVisualInput slice takes consecutive entries")
        stop = max(first, stop)
        return QwenVisualInput(self.pixel_values[starts[first]:starts[stop]], self.grid_thw[first:stop],
                               self.seconds_per_slot[first:stop], self.slot_timestamps[first:stop])


def qwen_frame_count(total_frames: int, video_fps: float, fps: float = QWEN_FPS, min_frames: int = QWEN_MIN_FRAMES,
                     max_frames: int = QWEN_MAX_FRAMES) -> int:
    """Frames to sample from a video, by qwen-vl-utils' rule (even: two frames per temporal slot), or the one
    frame of a one-frame video (``video_inputs`` repeats it into a slot)."""
    if total_frames < 1:
        raise DymuError("a Qwen-VL video needs at least one frame, this one has none")
    if not video_fps > 0 or not fps > 0:
        raise DymuError("sampling by fps needs a positive frame rate for the video and for the sampling")
    if total_frames < FRAMES_PER_SLOT:
        return total_frames
    low = math.ceil(min_frames / FRAMES_PER_SLOT) * FRAMES_PER_SLOT
    high = math.floor(min(max_frames, total_frames) / FRAMES_PER_SLOT) * FRAMES_PER_SLOT
    wanted = min(max(total_frames / video_fps * fps, low), high, total_frames)
    return max(FRAMES_PER_SLOT, math.floor(wanted / FRAMES_PER_SLOT) * FRAMES_PER_SLOT)


def fill_last_slot(items: Sequence | np.ndarray, per_slot: int = FRAMES_PER_SLOT) -> list | np.ndarray:
    """``items`` (frames, or their times) with the last one repeated up to a whole number of temporal slots:
    how the Qwen-VL processors pair an odd count (their ``patchify`` and Qwen3-VL's timestamps)."""
    pad = -len(items) % per_slot
    if isinstance(items, np.ndarray):
        return np.concatenate([items, np.repeat(items[-1:], pad, axis=0)]) if pad else items
    return list(items) + list(items[-1:]) * pad


def processor_frames(frames: np.ndarray, per_slot: int = FRAMES_PER_SLOT) -> np.ndarray:
    """The frames to give a Qwen-VL video processor: a clip shorter than one slot (one frame) filled up to a
    slot, since Qwen3-VL's resize refuses it; longer ones as they are, since the processor fills their last
    slot itself and its pixel budget counts the frames it is given (transformers' pipeline on these frames)."""
    return fill_last_slot(frames, per_slot) if len(frames) < per_slot else frames


def slot_times(frame_timestamps: Sequence[float]) -> list[float]:
    """Mean time of each slot's frames (an odd last frame is repeated, as the processors pad it)."""
    times = fill_last_slot(frame_timestamps)
    return [(times[i] + times[i + FRAMES_PER_SLOT - 1]) / 2 for i in range(0, len(times), FRAMES_PER_SLOT)]


def image_inputs(processor, images: Sequence[Image.Image | np.ndarray]) -> QwenVisualInput:
    """Still images through the model's image processor (dynamic resolution, one temporal slot each)."""
    rgb = [img.convert("RGB") if isinstance(img, Image.Image) else np.asarray(img) for img in images]
    out = processor.image_processor(images=rgb, return_tensors="pt")
    n = len(rgb)
    return QwenVisualInput(out["pixel_values"], out["image_grid_thw"], [0.0] * n, [[] for _ in range(n)])


def video_inputs(processor, frames: np.ndarray, timestamps: Sequence[float], total_frames: int | None = None,
                 video_fps: float | None = None) -> QwenVisualInput:
    """Sampled frames (T, H, W, 3) uint8 of one video, with their times in seconds, through the model's video
    processor (frames already sampled: it only resizes, normalises and pairs them into slots).

    With the video's ``total_frames`` and ``video_fps``, a slot lasts 2 / sampled_fps seconds, sampled_fps =
    T / total_frames * video_fps, as transformers' Qwen2.5-VL processor computes ``second_per_grid_ts``;
    without them, the spacing of the slot times."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise DymuError(f"frames must be a (T, H, W, 3) array with T >= 1, got shape {frames.shape}")
    if len(timestamps) != frames.shape[0]:
        raise DymuError(f"{len(timestamps)} timestamps for {frames.shape[0]} frames")
    out = processor.video_processor(videos=[processor_frames(frames, processor.video_processor.temporal_patch_size)],
                                    do_sample_frames=False, return_tensors="pt")
    stamps = slot_times(timestamps)
    if total_frames and video_fps:
        seconds = FRAMES_PER_SLOT / (frames.shape[0] / total_frames * video_fps)
    elif len(stamps) > 1:
        seconds = float(stamps[1] - stamps[0])
    else:  # one slot: its length is its two frames' spacing (none: a still)
        seconds = float(timestamps[-1] - timestamps[0]) * FRAMES_PER_SLOT / max(1, len(timestamps) - 1)
    return QwenVisualInput(out["pixel_values_videos"], out["video_grid_thw"], [seconds], [stamps])


def read_video_inputs(processor, path: str | Path, fps: float = QWEN_FPS, min_frames: int = QWEN_MIN_FRAMES,
                      max_frames: int = QWEN_MAX_FRAMES) -> QwenVisualInput:
    """A video file sampled by qwen-vl-utils' fps rule, through the model's video processor."""
    total, video_fps = probe_video(path)
    video = read_video_frames(path, num_frames=qwen_frame_count(total, video_fps, fps, min_frames, max_frames))
    return video_inputs(processor, video.frames, video.timestamps, video.total_frames, video.source_fps)


def concat_inputs(parts: Sequence[QwenVisualInput]) -> QwenVisualInput:
    """Several inputs as one batch for the encoder (entries keep their order)."""
    return QwenVisualInput(
        torch.cat([p.pixel_values for p in parts]),
        torch.cat([p.grid_thw for p in parts]),
        [s for p in parts for s in p.seconds_per_slot],
        [t for p in parts for t in p.slot_timestamps],
    )
