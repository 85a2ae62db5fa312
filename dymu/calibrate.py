"""Calibrating DToMe's per-layer thresholds, as DyMU does it.

The target is an average number of tokens to keep per image. The merges that takes (positions - keep) are
split evenly over the layers run, r per layer. Batch after batch of B images, layer l merges the B * r
best edges of the whole batch (so simple images give more of the merges than busy ones) and records
tau_batch, the score of the best edge it left. The layer's threshold is the mean tau_batch over batches.
At inference each image then merges by the thresholds alone, and its token count follows its content.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from dymu.errors import DymuError
from dymu.merge import Edges, batch_top_merges
from dymu.presets import PRESET_SHARES, preset_keep  # noqa: F401  (importable from here too)
from dymu.vision.encoder import DToMeEncoder

log = logging.getLogger(__name__)

NO_MERGE = 1.0  # the threshold of a layer that never merges: no cosine is above 1


def merges_per_layer(num_positions: int, keep: float, num_layers: int) -> float:
    """r: merges per image per layer that bring ``num_positions`` down to ``keep`` over ``num_layers``."""
    if not 1 <= keep < num_positions:
        raise DymuError(f"tokens to keep must be between 1 and {num_positions - 1}, got {keep:g}")
    if num_layers < 1:
        raise DymuError("the encoder runs no layer before its feature layer; there is nothing to merge in")
    return (num_positions - keep) / num_layers


@dataclass
class BatchTopPolicy:
    """Calibration's merge policy: each layer merges the batch's best round(B * r) edges."""

    merges_per_image: float
    num_layers: int
    observed: list[list[float]] = field(init=False)

    def __post_init__(self) -> None:
        self.observed = [[] for _ in range(self.num_layers)]

    def active(self, layer: int) -> bool:
        return self.merges_per_image > 0

    def choose(self, layer: int, edges: Edges) -> torch.Tensor:
        merge, tau_batch = batch_top_merges(edges, round(edges.scores.shape[0] * self.merges_per_image))
        if tau_batch is not None:
            self.observed[layer].append(tau_batch)
        return merge

    def taus(self) -> list[float]:
        # A layer that recorded no threshold (it merged every edge it was offered, or was asked for none)
        # gets the default 1.0, no merging: a made-up low threshold would let inference merge whatever the
        # cap allows, far more than calibration asked of it on content simpler than its data.
        return [sum(seen) / len(seen) if seen else NO_MERGE for seen in self.observed]


def calibrate(
    encoder: DToMeEncoder,
    batches: Iterable[torch.Tensor],
    keep: float,
    on_batch: Callable[[int], None] | None = None,
) -> list[float]:
    """Per-layer thresholds that keep ``keep`` tokens per image on average over ``batches`` of pixels.

    ``on_batch(n)`` is called after each batch of n images (progress reporting).
    """
    policy = BatchTopPolicy(merges_per_layer(encoder.num_positions, keep, encoder.num_layers), encoder.num_layers)
    seen = 0
    for pixels in batches:
        encoder.run(pixels, policy)
        seen += len(pixels)
        if on_batch:
            on_batch(len(pixels))
    if seen == 0:
        raise DymuError("the calibration set is empty")
    taus = policy.taus()
    log.info("calibrated %d layers on %d images: taus %s", len(taus), seen, [round(t, 4) for t in taus])
    return taus


def token_counts(
    encoder: DToMeEncoder, batches: Iterable[torch.Tensor], on_batch: Callable[[int], None] | None = None
) -> list[int]:
    """Tokens each image keeps with the encoder's thresholds."""
    counts: list[int] = []
    for pixels in batches:
        counts.extend(image.num_tokens for image in encoder(pixels))
        if on_batch:
            on_batch(len(pixels))
    return counts
