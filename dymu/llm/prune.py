"""DyRate-style progressive pruning of visual KV entries while an answer is written.

As an answer grows, the new tokens pay less and less attention to the visual tokens, so more of them can
go. At a probe layer L, the new token's attention over the cache (heads averaged) is summarised into
``AttentionStats``; a ``RatePredictor`` turns that into the fraction of visual entries to keep; the least
attended visual entries are dropped from the caches of layers L+1.. and the caches are compacted. Text
entries (prompt and generated) are never dropped, and dropped entries never come back, so the kept count
only falls.

The default predictor is a training-free rule: keep the share of the first step's visual attention that is
still paid (``visual_mass / first_visual_mass``), optionally sharpened and blended with how spread the
visual attention is. Any object with a ``keep_fraction(stats) -> float`` method can replace it, e.g. the
small learned predictor the DyRate paper trains on attention statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from dymu.errors import DymuError
from dymu.llm.config import PruneConfig
from dymu.llm.grouped_cache import GroupedKVCache
from dymu.llm.kv_cache import KVCache


@dataclass(frozen=True)
class AttentionStats:
    """One decode step's attention at the probe layer, heads averaged.

    visual_mass: share of the attention on visual entries now; first_visual_mass: the same at step 1.
    visual_entropy: entropy (nats) of the attention over visual entries, renormalised to sum to 1.
    num_visual: visual entries in the prompt; num_kept: visual entries still in the pruned layers.
    """

    step: int
    visual_mass: float
    first_visual_mass: float
    visual_entropy: float
    num_visual: int
    num_kept: int

    @property
    def mass_ratio(self) -> float:
        """How much of the first step's visual attention is still paid (capped at 1)."""
        return min(1.0, self.visual_mass / max(self.first_visual_mass, 1e-12))

    @property
    def spread(self) -> float:
        """Effective share of visual entries that receive attention: exp(entropy) / count, in (0, 1]."""
        return min(1.0, math.exp(self.visual_entropy) / max(self.num_visual, 1))


class RatePredictor(Protocol):
    """Turns attention statistics into the fraction (0..1) of the prompt's visual entries to keep."""

    def keep_fraction(self, stats: AttentionStats) -> float: ...


class Probe(Protocol):
    """What ``decode_step`` calls at layer ``layer`` on the steps it wants: a ``Pruner``, or a recorder."""

    layer: int

    def wants_probe(self, step: int) -> bool: ...

    def observe(self, step: int, weights: torch.Tensor, cache: KVCache | GroupedKVCache) -> None: ...


@dataclass
class AttentionFallRule:
    """Training-free: keep ``mass_ratio ** sharpness``, geometrically blended with ``spread`` by
    ``entropy_weight`` (peaked visual attention needs fewer entries)."""

    sharpness: float = 1.0
    entropy_weight: float = 0.0

    def keep_fraction(self, stats: AttentionStats) -> float:
        keep = stats.mass_ratio ** self.sharpness
        return keep ** (1.0 - self.entropy_weight) * stats.spread ** self.entropy_weight


@dataclass
class LinearSchedule:
    """A fixed schedule, blind to attention: keep 1.0 until ``start`` then fall linearly to ``final`` at ``end``.

    Useful as a baseline and where attention statistics mean little (random-weight benchmarks).
    """

    start: int
    end: int
    final: float

    def keep_fraction(self, stats: AttentionStats) -> float:
        progress = min(1.0, max(0.0, (stats.step - self.start) / max(self.end - self.start, 1)))
        return 1.0 - progress * (1.0 - self.final)


def attention_stats(step: int, weights: torch.Tensor, visual: torch.Tensor, first_visual_mass: float | None,
                    num_kept: int) -> AttentionStats:
    """Summarise the probe layer's attention ``weights`` (T,) over entries flagged ``visual`` (T,)."""
    on_visual = weights[visual]
    mass = float(on_visual.sum())
    p = on_visual / max(mass, 1e-12)
    entropy = float(-(p * torch.log(p.clamp_min(1e-30))).sum())
    first = mass if first_visual_mass is None else first_visual_mass
    return AttentionStats(step, mass, first, entropy, int(visual.sum()), num_kept)


def entries_to_keep(visual: torch.Tensor, scores: torch.Tensor, num_visual_kept: int) -> torch.Tensor:
    """Indices (ascending) of every non-visual entry plus the ``num_visual_kept`` best-scored visual ones."""
    ranked = scores.float().masked_fill(~visual, float("inf"))
    count = int((~visual).sum()) + num_visual_kept
    return torch.topk(ranked, count, sorted=False).indices.sort().values


class Pruner:
    """Applies a ``PruneConfig`` during decoding: probes layer ``config.layer``, compacts the layers after it.

    ``trace`` lists (step, visual entries kept) at the first probe and at every change; ``history`` keeps
    every decision's statistics and chosen fraction, for inspection.
    """

    def __init__(self, config: PruneConfig, num_layers: int, predictor: RatePredictor | None = None) -> None:
        if config.layer >= num_layers - 1:
            raise DymuError(f"prune layer {config.layer} leaves no later layer to prune (the model has {num_layers})")
        self.config = config
        self.layer = config.layer
        self.predictor = predictor or AttentionFallRule(config.sharpness, config.entropy_weight)
        self.first_visual_mass: float | None = None
        self.trace: list[tuple[int, int]] = []
        self.history: list[tuple[AttentionStats, float]] = []

    def wants_probe(self, step: int) -> bool:
        return step == 1 or self.config.is_decision_step(step)

    def observe(self, step: int, weights: torch.Tensor, cache: KVCache | GroupedKVCache) -> None:
        """Read the probe layer's attention ``weights`` (T,) at ``step``; prune the later layers if due."""
        pruned = self.layer + 1
        kept = cache.num_visual(pruned)
        stats = attention_stats(step, weights, cache.visual(self.layer), self.first_visual_mass, kept)
        if self.first_visual_mass is None:
            self.first_visual_mass = stats.visual_mass
            self.trace.append((step, kept))
        if not self.config.is_decision_step(step) or stats.num_visual == 0:
            return
        fraction = min(1.0, max(self.config.min_keep, float(self.predictor.keep_fraction(stats))))
        self.history.append((stats, fraction))
        target = min(kept, math.ceil(fraction * stats.num_visual))
        if target >= kept:
            return
        # Scores by position: the probe layer is never pruned, so it sees every entry the later layers hold.
        # Positions are ascending in every layer (M-RoPE prompts record entry ids, some negative), so a
        # binary search finds each pruned-layer entry in the probe layer.
        found = torch.searchsorted(cache.positions(self.layer), cache.positions(pruned))
        index = entries_to_keep(cache.visual(pruned), weights[found], target)
        for layer in range(pruned, cache.num_layers):
            cache.keep(layer, index)
        self.trace.append((step, target))
