"""From pixels to the LLM's merged visual tokens: DToMe per frame, the projector and the model's own
layout (see ``dymu.layout``), then temporal merging across frames.

``VisualTokenizer.encode_frames`` / ``encode_image`` return a ``MergedTokens`` in the LLM's hidden size
whose mapping covers exactly the positions the unmodified model would give the LLM. Its ``meta["stages"]``
records the token count after every stage, so a report can say where the savings came from.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from dymu.families.base import VLMFamily
from dymu.layout import append_learned_row, compose
from dymu.temporal import concatenate_frames, merge_frames
from dymu.tokens import MergedTokens
from dymu.vision.encoder import DToMeEncoder, layers_to_run
from dymu.vision.runner import MergedImage

log = logging.getLogger(__name__)


@dataclass
class PendingTokens:
    """One medium between its two halves of encoding: the inputs it gives the vision encoder (``pixels``,
    plus the Qwen-VL ``grid`` of its entries) and ``finish``, which turns the encoder's results for those
    inputs, and the seconds the encoder spent on them, into its ``MergedTokens``. Several media's pending
    inputs can go through the encoder together (``dymu.batch_encode``)."""

    pixels: torch.Tensor
    finish: Callable[[list[Any], float], MergedTokens]
    grid: torch.Tensor | None = None
    kind: str = "video"
    seconds_per_slot: list[float] = field(default_factory=list)

    @property
    def num_inputs(self) -> int:
        """Encoder inputs (frames, crops or grid entries), each with its own result."""
        return int(self.pixels.shape[0] if self.grid is None else self.grid.shape[0])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def patch_change(a: torch.Tensor, b: torch.Tensor, patch: int) -> float:
    """The largest mean absolute difference of two (3, H, W) frames over ``patch`` x ``patch`` squares.

    Sensor noise averages out within a square while a change as small as one patch stands out, which a
    whole-frame mean would dilute."""
    diff = (a - b).abs().mean(dim=0, keepdim=True)
    return float(torch.nn.functional.avg_pool2d(diff, patch).max())


def reused_frames(pixels: torch.Tensor, threshold: float, patch: int = 14) -> list[int]:
    """For each frame, the frame whose encoder output it uses: itself, or the last encoded frame when no
    patch changed by more than ``threshold`` since (``patch_change``). Comparing with the last *encoded*
    frame, not the previous one, means a slow drift still triggers a new encoding."""
    source = [0] * len(pixels)
    last = 0
    for t in range(1, len(pixels)):
        if threshold <= 0 or patch_change(pixels[t], pixels[last], patch) > threshold:
            last = t
        source[t] = last
    return source


class VisualTokenizer:
    """Turns frames or an image into LLM-side merged tokens for one model.

    taus: DToMe thresholds per encoder layer, or None for the stock encoder (nothing merged).
    temporal_threshold: cosine above which a token merges with the previous frame's (>= 1.0: off).
    reuse_threshold: a video frame none of whose patches changed by more than this since the last encoded
        frame (mean absolute difference of normalised pixels over a patch) reuses that frame's encoder
        output instead of running the encoder again; 0 = encode every frame. A static camera then costs
        about one encoder pass.
    batch_size: frames per encoder call (bounds memory on long videos).
    merge_order: DToMe's row order after each merge ("positional" or "authors", see ``dymu.merge``).
    """

    def __init__(
        self,
        family: VLMFamily,
        taus: Sequence[float] | None,
        temporal_threshold: float = 1.0,
        reuse_threshold: float = 0.0,
        batch_size: int = 8,
        merge_order: str = "positional",
    ):
        self.family = family
        self.taus = None if taus is None else list(taus)
        self.temporal_threshold = temporal_threshold
        self.reuse_threshold = reuse_threshold
        self.batch_size = batch_size
        drop_cls = getattr(family.config, "vision_feature_select_strategy", "full") == "default"
        self.encoder = DToMeEncoder(family.vision_tower, taus, family.feature_layer, drop_cls=drop_cls,
                                    merge_order=merge_order)

    @property
    def device(self) -> torch.device:
        return next(self.family.model.parameters()).device

    @property
    def num_layers(self) -> int:
        """Encoder layers that run (and need a threshold each)."""
        return layers_to_run(self.family.feature_layer, len(self.encoder.parts.layers))

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray, timestamps: Sequence[float] = ()) -> MergedTokens:
        """Frames (T, H, W, 3) uint8 of one video -> merged tokens of the whole video.

        Each frame is merged by DToMe and laid out (projector, pooling) on its own; temporal merging then
        runs on those LLM-side rows, so a static region keeps one row for all frames even where DToMe grouped
        its patches a little differently from frame to frame. The model's newline ends the video.
        """
        return self.encode_alone(self.prepare_frames(frames, timestamps))

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> MergedTokens:
        """One image (its crops, for AnyRes models) -> merged tokens in the model's image layout."""
        return self.encode_alone(self.prepare_image(image))

    @torch.no_grad()
    def encode_alone(self, pending: PendingTokens) -> MergedTokens:
        started = time.perf_counter()
        images = self.encode_pending([pending])[0]
        return pending.finish(images, time.perf_counter() - started)

    def prepare_frames(self, frames: np.ndarray, timestamps: Sequence[float] = ()) -> PendingTokens:
        """A video's frames as pixels for the encoder (frames that reuse an earlier frame's output left
        out), and how to turn the encoder's results into the video's tokens (``PendingTokens.finish``)."""
        started = time.perf_counter()
        pixels = self.family.frame_pixels(frames)
        source = reused_frames(pixels, self.reuse_threshold, self.family.config.vision_config.patch_size)
        keys = sorted(set(source))

        def finish(encoded: list[MergedImage], encode_seconds: float) -> MergedTokens:
            by_key = dict(zip(keys, encoded))
            images = [by_key[s] for s in source]
            laid_out = time.perf_counter()
            frame_map = self.family.frame_map()
            per_frame = [compose(image.to_tokens(), frame_map, self.family.project) for image in images]
            tokens = merge_frames(per_frame, self.temporal_threshold)
            stages = {
                "encoded_frames": len(keys),
                "layout_rows_per_frame": [frame.num_unique for frame in per_frame],
                "temporal_rows_per_frame": tokens.rows_per_frame(),
            }
            if self.family.newline is not None:
                tokens = append_learned_row(tokens, self.family.newline)
            tokens.timestamps = [float(t) for t in timestamps]
            _synchronize(self.device)
            return self._finish(tokens, images, stages, prepared + encode_seconds, laid_out)

        prepared = time.perf_counter() - started
        return PendingTokens(pixels[keys], finish)

    def prepare_image(self, image: Image.Image) -> PendingTokens:
        """As ``prepare_frames`` for one image (its crops are the encoder's inputs)."""
        started = time.perf_counter()
        pixels, position_map = self.family.image_pixels(image)

        def finish(images: list[MergedImage], encode_seconds: float) -> MergedTokens:
            laid_out = time.perf_counter()
            # The crops of one image are laid out together (packing mixes them); no temporal merging.
            tokens = compose(concatenate_frames([i.to_tokens() for i in images]), position_map, self.family.project,
                             self.family.newline)
            tokens.positions_per_frame = [tokens.num_positions]
            _synchronize(self.device)
            stages = {"encoded_frames": len(images), "layout_rows_per_frame": [tokens.num_unique],
                      "temporal_rows_per_frame": [tokens.num_unique]}
            return self._finish(tokens, images, stages, prepared + encode_seconds, laid_out)

        prepared = time.perf_counter() - started
        return PendingTokens(pixels, finish, kind="image")

    def encode_pending(self, pending: Sequence[PendingTokens]) -> list[list[MergedImage]]:
        """The encoder's results for several media at once: their pixels go through the encoder as one
        packed batch (in chunks of ``batch_size`` frames, which may span media), cut back per media."""
        pixels = torch.cat([p.pixels for p in pending]) if len(pending) > 1 else pending[0].pixels
        images = self.encode_pixels(pixels)
        _synchronize(self.device)
        out, start = [], 0
        for p in pending:
            out.append(images[start: start + p.num_inputs])
            start += p.num_inputs
        return out

    def encode_pixels(self, pixels: torch.Tensor) -> list[MergedImage]:
        """DToMe (or the stock encoder when ``taus`` is None) on (T, 3, H, W) pixels, in batches."""
        results: list[MergedImage] = []
        for start in range(0, len(pixels), self.batch_size):
            batch = pixels[start : start + self.batch_size]
            results.extend(self.encoder(batch) if self.taus is not None else self._stock(batch))
        return results

    def _stock(self, pixels: torch.Tensor) -> list[MergedImage]:
        """The unmodified encoder's features, each position its own row (the `off` path)."""
        weight = next(self.family.vision_tower.parameters())
        out = self.family.vision_tower(pixels.to(weight.device, weight.dtype), output_hidden_states=True)
        features = out.hidden_states[self.family.feature_layer]
        if self.encoder.drop_cls:
            features = features[:, 1:]
        n = features.shape[1]
        ids = torch.arange(n, device=features.device)
        return [MergedImage(f, torch.ones_like(ids), ids) for f in features]

    def _finish(self, tokens: MergedTokens, images: list[MergedImage], stages: dict, encode_seconds: float,
                laid_out: float) -> MergedTokens:
        tokens.meta = {
            "frames": len(tokens.positions_per_frame),
            "stages": {
                "encoder_tokens_per_frame": self.encoder.num_positions,
                "dtome_tokens_per_frame": [image.num_tokens for image in images],
                **stages,
                "llm_positions": tokens.num_positions,
                "llm_rows": tokens.num_unique,
            },
            "seconds": {"encode": encode_seconds, "layout": time.perf_counter() - laid_out},
        }
        log.info(
            "%d frames: %d encoder tokens -> %d after DToMe -> %d LLM rows (%d after temporal merging) "
            "for %d positions", len(images), self.encoder.num_positions * len(images),
            sum(i.num_tokens for i in images), sum(stages["layout_rows_per_frame"]), tokens.num_unique,
            tokens.num_positions,
        )
        return tokens
