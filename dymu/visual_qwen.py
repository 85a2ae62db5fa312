"""From pixels to Qwen2.5-VL / Qwen3-VL merged visual tokens: the processor's pixels, DToMe inside the vision
model (``dymu.vision.qwen_vl``) or its stock features, then temporal merging on the merger outputs.

The result is one ``MergedTokens`` whose mapping covers the merger outputs in the order the prompt's
placeholders take them (temporal slot, then row-major cells), with the DeepStack rows that go with it
(Qwen3-VL) and, in ``meta``, what the prompt and the M-RoPE positions need: ``grid_thw``,
``seconds_per_slot`` and ``video_metadata`` (where the frames were taken), plus the usual report fields.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from dymu.families.qwen_vl import QwenVLFamily
from dymu.temporal import merge_frames
from dymu.tokens import MergedTokens
from dymu.vision.qwen_inputs import fill_last_slot
from dymu.vision.qwen_vl import QwenDToMeEncoder
from dymu.visual import PendingTokens

log = logging.getLogger(__name__)


def slot_seconds(frame_seconds: Sequence[float], slots: int) -> list[float]:
    """The middle of each temporal slot's frame pair (the processor repeats the last frame of an odd count)."""
    seconds = fill_last_slot(frame_seconds)
    return [float(a + b) / 2 for a, b in zip(seconds[0::2], seconds[1::2])][:slots]


def split_slots(tokens: MergedTokens) -> list[MergedTokens]:
    """One ``MergedTokens`` per temporal slot (a slot's rows are contiguous and never span two slots), with
    its DeepStack rows and its timestamp if ``tokens`` has them."""
    slots, row, position = [], 0, 0
    for index, count in enumerate(tokens.positions_per_frame):
        mapping = tokens.mapping[position: position + count] - row
        rows = slice(row, row + int(mapping.max()) + 1)
        slots.append(MergedTokens(tokens.embeds[rows], tokens.sizes[rows], mapping, [count],
                                  timestamps=tokens.timestamps[index: index + 1], config_hash=tokens.config_hash,
                                  deepstack=[d[rows] for d in tokens.deepstack]))
        row, position = rows.stop, position + count
    return slots


def temporal_merge(tokens: MergedTokens, threshold: float) -> MergedTokens:
    """Merge rows across consecutive temporal slots (``dymu.temporal``); DeepStack rows follow the merge."""
    if threshold >= 1.0 or tokens.num_frames < 2:
        return tokens
    merged = merge_frames(split_slots(tokens), threshold)
    merged.timestamps, merged.meta = list(tokens.timestamps), dict(tokens.meta)
    return merged.validate()


def reused_slots(pixels: torch.Tensor, slots: int, threshold: float) -> list[int]:
    """For each temporal slot of a video's patches (slots * cells, features), the slot whose encoding it uses:
    itself, or the last encoded slot when none of its patches changed by more than ``threshold`` (mean
    absolute difference of the patch's normalised pixels, both frames) since; 0 = encode every slot."""
    per_slot = pixels.view(slots, -1, pixels.shape[-1])
    source, last = [0] * slots, 0
    for slot in range(1, slots):
        if threshold <= 0 or float((per_slot[slot] - per_slot[last]).abs().mean(-1).max()) > threshold:
            last = slot
        source[slot] = last
    return source


def join_slots(parts: Sequence[MergedTokens]) -> MergedTokens:
    """Temporal slots side by side (each keeps its own rows), DeepStack rows alike."""
    offsets = torch.tensor([0] + [p.num_unique for p in parts[:-1]]).cumsum(0).tolist()
    taps = len(parts[0].deepstack)
    return MergedTokens(
        embeds=torch.cat([p.embeds for p in parts]),
        sizes=torch.cat([p.sizes for p in parts]),
        mapping=torch.cat([p.mapping + offset for p, offset in zip(parts, offsets)]),
        positions_per_frame=[n for p in parts for n in p.positions_per_frame],
        deepstack=[torch.cat([p.deepstack[i] for p in parts]) for i in range(taps)],
        meta=dict(parts[0].meta),
    )


class QwenVisualTokenizer:
    """Frames or an image -> merged tokens for a Qwen-VL model. ``taus``: DToMe thresholds per vision block,
    or None for the stock features (``get_image_features`` / ``get_video_features``, nothing merged).
    ``reuse_threshold``: a temporal slot none of whose patches changed by more than this since the last
    encoded slot reuses its encoding (``reused_slots``); 0 = encode every slot. Slots are encoded each as
    its own grid entry, which is what the vision model does within one video (attention never crosses a slot).
    """

    def __init__(self, family: QwenVLFamily, taus: Sequence[float] | None, temporal_threshold: float = 1.0,
                 reuse_threshold: float = 0.0):
        self.family = family
        self.taus = None if taus is None else list(taus)
        self.temporal_threshold = temporal_threshold
        self.reuse_threshold = reuse_threshold
        self.encoder = QwenDToMeEncoder(family.vision_tower, self.taus)

    @property
    def device(self) -> torch.device:
        return next(self.family.model.parameters()).device

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray, timestamps: Sequence[float] = (),
                      video_metadata: dict[str, Any] | None = None) -> MergedTokens:
        return self.encode_alone(self.prepare_frames(frames, timestamps, video_metadata))

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> MergedTokens:
        return self.encode_alone(self.prepare_image(image))

    @torch.no_grad()
    def encode_alone(self, pending: PendingTokens) -> MergedTokens:
        started = time.perf_counter()
        encoded = self.encode_pending([pending])[0]
        return pending.finish(encoded, time.perf_counter() - started)

    def prepare_frames(self, frames: np.ndarray, timestamps: Sequence[float] = (),
                       video_metadata: dict[str, Any] | None = None) -> PendingTokens:
        """A video's temporal slots as encoder inputs (one grid entry per slot it encodes) and how to finish
        its tokens from their results (see ``dymu.visual.PendingTokens``)."""
        started = time.perf_counter()
        inputs, source, keys, pending = self._prepare_slots(frames, video_metadata)
        metadata = inputs["video_metadata"]
        grid = inputs["video_grid_thw"]

        def finish(encoded_slots: list[MergedTokens], encode_seconds: float) -> MergedTokens:
            by_slot = dict(zip(keys, encoded_slots))
            tokens = join_slots([by_slot[slot] for slot in source])
            laid_out = time.perf_counter()
            dtome_rows = tokens.rows_per_frame()
            tokens = temporal_merge(tokens, self.temporal_threshold)
            tokens.timestamps = slot_seconds(metadata.timestamps, tokens.num_frames)
            tokens.meta.update(seconds_per_slot=pending.seconds_per_slot[0], video_frames=len(frames),
                               video_metadata={"total_num_frames": int(metadata.total_num_frames),
                                               "fps": float(metadata.fps),
                                               "frames_indices": [int(i) for i in metadata.frames_indices]})
            tokens.meta["encoded_slots"] = len(keys)
            return self._finish(tokens, grid, dtome_rows, prepared + encode_seconds, laid_out)

        prepared = time.perf_counter() - started
        pending.finish = finish
        return pending

    @torch.no_grad()
    def encode_slots(self, frames: np.ndarray) -> list[MergedTokens]:
        """A live feed's frames (T, H, W, 3), two per temporal slot (an odd last one repeated, as the processor
        does) -> one ``MergedTokens`` per slot with its DeepStack rows and ``meta["grid_thw"]`` [1, h, w];
        nothing merged across slots (the feed's memory does that)."""
        inputs, source, keys, pending = self._prepare_slots(frames, None)
        by_slot = dict(zip(keys, self.encode_pending([pending])[0]))
        _, h, w = (int(v) for v in inputs["video_grid_thw"][0])
        return [replace(by_slot[slot], meta={"grid_thw": [1, h, w]}) for slot in source]  # reused: shared rows

    def _prepare_slots(self, frames: np.ndarray, video_metadata: dict[str, Any] | None
                       ) -> tuple[dict[str, Any], list[int], list[int], PendingTokens]:
        """The processor's outputs of a video, for each temporal slot the slot whose encoding it uses (a slot
        whose patches did not change reuses the last encoded one), the slots to encode, and their inputs."""
        inputs = self.family.video_inputs(frames, video_metadata)
        seconds = self.family.seconds_per_slot(inputs["video_metadata"])
        pixels = inputs["pixel_values_videos"]
        t, h, w = (int(v) for v in inputs["video_grid_thw"][0])
        source = reused_slots(pixels, t, self.reuse_threshold)
        keys = sorted(set(source))
        slot_pixels = pixels.view(t, h * w, -1)[keys].reshape(-1, pixels.shape[-1])
        pending = PendingTokens(slot_pixels, None, torch.tensor([[1, h, w]] * len(keys)), "video",
                                [seconds] * len(keys))
        return inputs, source, keys, pending

    def prepare_image(self, image: Image.Image) -> PendingTokens:
        started = time.perf_counter()
        inputs = self.family.image_inputs(image)
        grid = inputs["image_grid_thw"]

        def finish(encoded: list[MergedTokens], encode_seconds: float) -> MergedTokens:
            tokens = encoded[0]
            return self._finish(tokens, grid, tokens.rows_per_frame(), prepared + encode_seconds, time.perf_counter())

        prepared = time.perf_counter() - started
        return PendingTokens(inputs["pixel_values"], finish, grid, "image", [0.0] * int(grid.shape[0]))

    def encode_pending(self, pending: Sequence[PendingTokens]) -> list[list[MergedTokens]]:
        """The encoder's results for several media of one kind at once: all their grid entries in one call
        (attention never crosses an entry), one ``MergedTokens`` per entry, cut back per medium."""
        pixels = torch.cat([p.pixels for p in pending])
        grid = torch.cat([p.grid for p in pending])
        seconds = [s for p in pending for s in p.seconds_per_slot]
        if self.taus is not None:
            results = self.encoder(pixels, grid, seconds_per_slot=seconds)
        else:
            results = self._stock(pixels, grid, pending[0].kind)
        out, start = [], 0
        for p in pending:
            out.append(results[start: start + p.num_inputs])
            start += p.num_inputs
        return out

    def _stock(self, pixels: torch.Tensor, grid: torch.Tensor, kind: str) -> list[MergedTokens]:
        """The stock features, each merger output its own row (the ``off`` path)."""
        model = self.family.model.model
        out = (model.get_image_features if kind == "image" else model.get_video_features)(
            pixels.to(self.device), grid.to(self.device), return_dict=True)
        sizes = [embeds.shape[0] for embeds in out.pooler_output]
        # transformers >= 5.2x splits each DeepStack tap per input, as the pooler output; older releases
        # return one tensor per tap over all inputs.
        deepstack = [tap if isinstance(tap, (list, tuple)) else torch.split(tap, sizes)
                     for tap in getattr(out, "deepstack_features", None) or []]
        results = []
        for entry, embeds in enumerate(out.pooler_output):
            ids = torch.arange(embeds.shape[0], device=embeds.device)
            t = int(grid[entry, 0])
            results.append(MergedTokens(embeds, torch.ones_like(ids), ids, [embeds.shape[0] // t] * t,
                                        deepstack=[tap[entry] for tap in deepstack]))
        return results

    def _finish(self, tokens: MergedTokens, grid: torch.Tensor, dtome_rows: list[int], encode_seconds: float,
                laid_out: float) -> MergedTokens:
        t, h, w = (int(v) for v in grid[0])
        merge = self.family.vision_tower.spatial_merge_size
        tokens.meta.update(
            frames=tokens.meta.get("video_frames", t),  # frames sampled (an image: 1), two per temporal slot
            slots=t,
            grid_thw=[t, h, w],
            stages={
                "encoder_tokens_per_frame": h * w,  # patches per temporal slot, before the 2x2 merger
                "encoded_frames": tokens.meta.get("encoded_slots", t),
                "dtome_tokens_per_frame": [rows * merge * merge for rows in dtome_rows],
                "layout_rows_per_frame": dtome_rows,
                "temporal_rows_per_frame": tokens.rows_per_frame(),
                "llm_positions": tokens.num_positions,
                "llm_rows": tokens.num_unique,
            },
            seconds={"encode": encode_seconds, "layout": time.perf_counter() - laid_out},
        )
        log.info("%d temporal slot(s) of %dx%d patches: %d LLM positions -> %d rows after DToMe -> %d after "
                 "temporal merging", t, h, w, tokens.num_positions, sum(dtome_rows), tokens.num_unique)
        return tokens


# --- live feeds -----------------------------------------------------------------------------------------
def feed_slots(visual: QwenVisualTokenizer, images: Sequence[np.ndarray], times: Sequence[float],
               config_hash: str) -> list[MergedTokens]:
    """A live feed's frames (H, W, 3) uint8 at ``times`` -> one ``MergedTokens`` per temporal slot of two
    consecutive frames, for the feed's memory (``dymu.memory``): stamped with its newer frame's time, its
    frames' times in ``meta["frame_times"]`` and its grid in ``meta["grid_thw"]``. Frames are paired in
    runs of one size (a feed's size can change when it reconnects); a run's odd last frame makes a slot of
    its own, repeated as the processor does."""
    runs: list[list[int]] = []
    for index, image in enumerate(images):
        if runs and image.shape == images[runs[-1][0]].shape:
            runs[-1].append(index)
        else:
            runs.append([index])
    slots = []
    per_slot = visual.family.processor.video_processor.temporal_patch_size
    merge = visual.family.vision_tower.spatial_merge_size
    for run in runs:
        encoded = visual.encode_slots(np.stack([images[i] for i in run]))
        for slot, first in zip(encoded, range(0, len(run), per_slot)):
            frame_times = [float(times[i]) for i in run[first: first + per_slot]]
            _, h, w = slot.meta["grid_thw"]
            slot.timestamps, slot.config_hash = [frame_times[-1]], config_hash
            slot.meta.update(frame_times=frame_times, encoder_tokens=h * w,
                             dtome_tokens=slot.num_unique * merge * merge)
            slots.append(slot.validate())
    return slots


def feed_video_metadata(frame_times: Sequence[Sequence[float]]) -> dict[str, Any]:
    """The ``video_metadata`` of a feed's window of temporal slots (each slot's frame times, oldest first),
    which the prompt (Qwen3-VL's text timestamps) and the seconds per slot (Qwen2.5-VL's M-RoPE time axis)
    are computed from as for a file: frames counted in milliseconds from the window's first frame, a slot
    of one frame repeating it as the processor does, and the clip lasting one mean frame interval past its
    last frame (so that the processor's sampled fps is the feed's)."""
    first = frame_times[0][0]
    indices = [round((t - first) * 1000) for times in frame_times for t in (times[0], times[-1])]
    last = indices[-1]
    total = round(last + last / (len(indices) - 1)) if last > 0 else 1000 * len(indices)  # one slot: 1 s a frame
    return {"total_num_frames": max(total, last + 1), "fps": 1000.0, "frames_indices": indices}
