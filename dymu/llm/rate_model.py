"""A tiny learned rate predictor (DyRate-style), the traces it learns from, and how it is fitted.

Trace: one unpruned answer, with the probe layer's attention over the prompt's visual entries at every
decode step (heads averaged) and the step's ``AttentionStats``.

Target at step t: entries dropped at t never come back, so the right keep fraction is the smallest share
of visual entries, ranked by step t's attention, that still holds ``coverage`` of the visual attention at
every step from t to t + ``horizon``. The current step alone cannot tell how attention will move; that is
what the predictor learns from the statistics it can see.

Model: a few statistics -> a two-layer MLP -> sigmoid = keep fraction, fitted by mean squared error and
saved with safetensors (weights plus a small JSON header; never pickle).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dymu.errors import DymuError
from dymu.llm.decoder import load_decoder
from dymu.llm.generate import decode_step, new_cache
from dymu.llm.grouped_cache import GroupedKVCache
from dymu.llm.kv_cache import KVCache
from dymu.llm.prune import AttentionStats, attention_stats
from dymu.llm.sequence import VirtualSequence
from dymu.llm.vtu import check_sequence, prefill

FEATURES = ("mass_ratio", "visual_mass", "spread", "log_step", "kept_share")
_STATS_FIELDS = ("step", "visual_mass", "first_visual_mass", "visual_entropy", "num_visual", "num_kept")


def features(stats: AttentionStats) -> list[float]:
    """The predictor's inputs, each roughly in [0, 1]."""
    return [
        stats.mass_ratio,
        stats.visual_mass,
        stats.spread,
        math.log1p(stats.step) / math.log1p(1024),
        stats.num_kept / max(stats.num_visual, 1),
    ]


@dataclass
class AttentionTrace:
    """Per decode step of an unpruned answer: its statistics and its visual attention (num_visual,)."""

    stats: list[AttentionStats] = field(default_factory=list)
    visual_weights: list[torch.Tensor] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        rows = [[float(getattr(s, name)) for name in _STATS_FIELDS] for s in self.stats]
        table = torch.tensor(rows, dtype=torch.float64)
        save_file({"stats": table, "visual_weights": torch.stack(self.visual_weights).float().contiguous()},
                  str(path), metadata={"kind": "dymu-attention-trace", "stats_fields": json.dumps(_STATS_FIELDS)})

    @classmethod
    def load(cls, path: str | Path) -> "AttentionTrace":
        tensors = _load(path, "dymu-attention-trace")
        stats = [AttentionStats(int(row[0]), float(row[1]), float(row[2]), float(row[3]), int(row[4]), int(row[5]))
                 for row in tensors["stats"].tolist()]
        return cls(stats, list(tensors["visual_weights"]))


class TraceRecorder:
    """A probe for ``decode_step`` that reads the attention at ``layer`` on every step and never prunes."""

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.trace = AttentionTrace()
        self._first_mass: float | None = None

    def wants_probe(self, step: int) -> bool:
        return True

    def observe(self, step: int, weights: torch.Tensor, cache: KVCache | GroupedKVCache) -> None:
        visual = cache.visual(self.layer)
        stats = attention_stats(step, weights, visual, self._first_mass, int(visual.sum()))
        if self._first_mass is None:
            self._first_mass = stats.visual_mass
        self.trace.stats.append(stats)
        self.trace.visual_weights.append(weights[visual].float().cpu())


@torch.no_grad()
def record_trace(model: nn.Module, sequence: VirtualSequence, layer: int, max_new_tokens: int = 256) -> AttentionTrace:
    """Write a greedy answer of ``max_new_tokens`` tokens (EOS ignored: longer traces teach more) with VTU
    prefill and no pruning, recording the probe layer's attention at every step."""
    decoder = load_decoder(model)
    sequence = check_sequence(decoder, sequence)
    if not 0 <= layer < decoder.num_layers:
        raise DymuError(f"probe layer {layer} is outside the model's {decoder.num_layers} layers")
    cache = new_cache(decoder, "expanded", sequence.num_positions + max_new_tokens)
    out = prefill(decoder, sequence, cache)
    recorder = TraceRecorder(layer)
    logits, position = out.logits, out.next_position
    for step in range(1, max_new_tokens):
        if position >= decoder.max_positions:
            break
        logits = decode_step(decoder, cache, int(logits.argmax()), position, step, recorder)
        position += 1
    return recorder.trace


def keep_targets(trace: AttentionTrace, coverage: float = 0.95,
                 horizon: int = 32) -> list[tuple[AttentionStats, float]]:
    """(statistics, target keep fraction) for every step of a trace (see the module docstring)."""
    if not 0.0 < coverage <= 1.0 or horizon < 0:
        raise DymuError(f"coverage must be in (0, 1] and horizon >= 0, got {coverage}, {horizon}")
    if not trace.stats:
        return []
    weights = torch.stack(trace.visual_weights).double()  # (steps, num_visual)
    num_visual = weights.shape[1]
    samples = []
    for t, stats in enumerate(trace.stats):
        order = weights[t].argsort(descending=True)
        future = weights[t: t + horizon + 1][:, order]
        covered = future.cumsum(dim=1) / future.sum(dim=1, keepdim=True).clamp_min(1e-30)
        needed = int(((covered < coverage - 1e-6).sum(dim=1) + 1).clamp(max=num_visual).max())
        samples.append((stats, needed / num_visual))
    return samples


class LearnedRate(nn.Module):
    """statistics -> keep fraction in (0, 1); a ``RatePredictor``."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(nn.Linear(len(FEATURES), hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x)).squeeze(-1)

    @torch.no_grad()
    def keep_fraction(self, stats: AttentionStats) -> float:
        return float(self(torch.tensor(features(stats), dtype=torch.float32)))

    def fit(self, samples: list[tuple[AttentionStats, float]], epochs: int = 400, lr: float = 0.02,
            seed: int = 0) -> float:
        """Full-batch Adam on mean squared error; returns the final loss."""
        if not samples:
            raise DymuError("no training samples: record some traces first")
        torch.manual_seed(seed)
        x = torch.tensor([features(s) for s, _ in samples], dtype=torch.float32)
        y = torch.tensor([target for _, target in samples], dtype=torch.float32)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        for _ in range(epochs):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(self(x), y)
            loss.backward()
            optimizer.step()
        return float(loss.detach())

    def save(self, path: str | Path) -> None:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(path), metadata={"kind": "dymu-rate-predictor", "features": json.dumps(FEATURES),
                                              "hidden": str(self.hidden)})

    @classmethod
    def load(cls, path: str | Path) -> "LearnedRate":
        tensors, metadata = _load(path, "dymu-rate-predictor", with_metadata=True)
        if json.loads(metadata.get("features", "[]")) != list(FEATURES):
            raise DymuError(f"{path} was fitted on other features than {FEATURES}")
        model = cls(int(metadata["hidden"]))
        model.load_state_dict(tensors)
        return model.eval()


def _load(path: str | Path, kind: str, with_metadata: bool = False) -> Any:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise DymuError(f"cannot read {path}: {exc}") from exc
    if metadata.get("kind") != kind:
        raise DymuError(f"{path} is not a {kind} file")
    return (tensors, metadata) if with_metadata else tensors
