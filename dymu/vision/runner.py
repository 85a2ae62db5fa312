"""Run a Hugging Face ViT's own layers with a DToMe merge step between attention and MLP.

The runner owns the forward logic; the modules own the weights. Each layer is

    x = x + out_proj(SDPA(q, k, v, bias))      # bias = log(size) per key once anything has merged
    merge similar tokens (keys summed over heads as the metric)
    x = x + mlp(layer_norm2(x))

which with nothing merged is exactly the stock pre-norm layer. Rows are packed (see ``dymu.merge``), so
norms, projections and the MLP only see real tokens; attention sees each image's own tokens. A family
adapter (``siglip.py``, ``clip.py``) only says how pixels become the first layer's input, where the layers
are and how many leading tokens are protected.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dymu.merge import Edges, TokenState, attention_bias, bipartite_edges, initial_state, merge_tokens
from dymu.tokens import MergedTokens


@dataclass
class EncoderParts:
    """What the runner needs from a vision tower.

    embed: pixels (B, 3, H, W) -> the first layer's input (B, T, D).
    layers: the tower's encoder layers (each with layer_norm1, self_attn, layer_norm2, mlp).
    num_protected: leading tokens that never merge (CLIP's CLS).
    """

    embed: Callable[[Tensor], Tensor]
    layers: Sequence[nn.Module]
    num_protected: int


class MergePolicy(Protocol):
    """Decides, layer by layer, which edges merge."""

    def active(self, layer: int) -> bool:
        """False when the layer cannot merge anything, so the edges need not be computed."""

    def choose(self, layer: int, edges: Edges) -> Tensor:
        """(B, TA) bool: which A rows merge into their B row."""


@dataclass
class ThresholdPolicy:
    """Inference: layer ``l`` merges the edges whose cosine is strictly above ``taus[l]``."""

    taus: Sequence[float]

    def active(self, layer: int) -> bool:
        return self.taus[layer] < 1.0

    def choose(self, layer: int, edges: Edges) -> Tensor:
        return edges.scores > self.taus[layer]


@dataclass
class MergedImage:
    """One image's merged features.

    features: (U, D) merged rows of the feature layer, in the order of their first position.
    sizes: (U,) int64, how many positions each row stands for.
    mapping: (N,) int64, the row standing for each position (raster patch order; CLS excluded when dropped).
    """

    features: Tensor
    sizes: Tensor
    mapping: Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_positions(self) -> int:
        return int(self.mapping.shape[0])

    def to_tokens(
        self, timestamp: float | None = None, config_hash: str = "", meta: dict[str, Any] | None = None
    ) -> MergedTokens:
        """As the stage contract's value, one frame (embeds are vision features, before any projector)."""
        return frames_to_tokens([self], [] if timestamp is None else [timestamp], config_hash, meta)


def frames_to_tokens(
    frames: Sequence[MergedImage],
    timestamps: Sequence[float] = (),
    config_hash: str = "",
    meta: dict[str, Any] | None = None,
) -> MergedTokens:
    """Stack per-frame results into one ``MergedTokens``: rows and positions frame after frame."""
    offsets = torch.tensor([0] + [f.num_tokens for f in frames[:-1]]).cumsum(0).tolist()
    return MergedTokens(
        embeds=torch.cat([f.features for f in frames]),
        sizes=torch.cat([f.sizes for f in frames]),
        mapping=torch.cat([f.mapping + offset for f, offset in zip(frames, offsets)]),
        positions_per_frame=[int(f.mapping.shape[0]) for f in frames],
        timestamps=list(timestamps),
        config_hash=config_hash,
        meta=dict(meta or {}),
    )


# Attention runs as one padded call (key masks hide the padding) while that wastes little, else image by
# image: a flat image merged to 30 tokens next to a busy one at 700 would otherwise pay 700^2 attention.
PADDED_ATTENTION_MAX_WASTE = 1.1


def _padding_is_cheap(lengths: list[int]) -> bool:
    return len(lengths) * max(lengths) ** 2 <= PADDED_ATTENTION_MAX_WASTE * sum(n * n for n in lengths)


def _attend(queries: Tensor, keys: Tensor, values: Tensor, state: TokenState, scale: float) -> Tensor:
    """SDPA of packed (M, H, hd) rows, each image over its own rows only.

    Keys get log(size) once their image has merged; an image that has not needs no mask, and SDPA runs
    faster without one.
    """
    merged = state.merged()
    if _padding_is_cheap(state.lengths):
        needs_bias = any(merged) or not state.uniform  # the bias also masks padding
        bias = attention_bias(state.to_padded(state.sizes), queries.dtype) if needs_bias else None
        q, k, v = (state.to_padded(t).transpose(1, 2) for t in (queries, keys, values))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        return state.to_packed(out.transpose(1, 2))
    outs = []
    for q, k, v, sizes, sized in zip(*(t.split(state.lengths) for t in (queries, keys, values, state.sizes)), merged):
        bias = attention_bias(sizes[None], q.dtype) if sized else None
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs)


def _self_attention(attn: nn.Module, state: TokenState, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """Pre-norm attention with the module's own projections; returns its output rows and keys (M, H, hd)."""
    hidden = norm(state.x)
    queries, keys, values = (proj(hidden).unflatten(-1, (attn.num_heads, attn.head_dim))
                             for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = _attend(queries, keys, values, state, attn.scale)
    return attn.out_proj(out.flatten(1)), keys


def run_layers(parts: EncoderParts, pixel_values: Tensor, num_layers: int, policy: MergePolicy) -> TokenState:
    """Embed, then run the first ``num_layers`` layers with DToMe; returns the packed merged batch."""
    state = initial_state(parts.embed(pixel_values))
    for index, layer in enumerate(parts.layers[:num_layers]):
        attended, keys = _self_attention(layer.self_attn, state, layer.layer_norm1)
        state = dataclasses.replace(state, x=state.x + attended)
        if policy.active(index):
            # Sum rather than mean over heads: the cosine does not care about scale.
            metric = state.to_padded(keys.sum(dim=1))
            edges = bipartite_edges(metric, state.to_padded(state.sizes), parts.num_protected)
            merge = policy.choose(index, edges)
            if bool(merge.any()):
                state = merge_tokens(state, edges, merge)
        state = dataclasses.replace(state, x=state.x + layer.mlp(layer.layer_norm2(state.x)))
    return state


def split_images(state: TokenState, drop_first: bool = False) -> list[MergedImage]:
    """Cut the packed batch into per-image results; ``drop_first`` removes a protected CLS row and position."""
    start = 1 if drop_first else 0
    images = []
    for x, sizes, mapping in zip(state.x.split(state.lengths), state.sizes.split(state.lengths), state.mapping):
        images.append(MergedImage(features=x[start:], sizes=sizes[start:].long(), mapping=mapping[start:] - start))
    return images
