"""Run a Hugging Face ViT's own layers with a DToMe merge step between attention and MLP.

The runner owns the forward logic; the modules own the weights. Each layer is

    x = x + out_proj(SDPA(q, k, v, bias))      # bias = log(size) per key once anything has merged
    merge similar tokens (keys averaged over heads as the metric)
    x = x + mlp(layer_norm2(x))

which with nothing merged is exactly the stock pre-norm layer. A family adapter (``siglip.py``, ``clip.py``)
only says how pixels become the first layer's input, where the layers are and how many leading tokens are
protected.
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

    def to_tokens(self, timestamp: float | None = None, config_hash: str = "", meta: dict[str, Any] | None = None) -> MergedTokens:
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


class _Rows:
    """The real rows of a padded batch, so that row-wise modules (norms, projections, MLP) skip padding.

    Padding only appears once images of a batch have merged by different amounts; with none, packing is
    the identity and costs nothing.
    """

    def __init__(self, sizes: Tensor | None = None):
        self.mask = None if sizes is None or bool((sizes > 0).all()) else sizes > 0

    def pack(self, x: Tensor) -> Tensor:
        return x if self.mask is None else x[self.mask]

    def unpack(self, rows: Tensor) -> Tensor:
        if self.mask is None:
            return rows
        full = rows.new_zeros(*self.mask.shape, rows.shape[-1])
        full[self.mask] = rows
        return full


def _self_attention(attn: nn.Module, x: Tensor, rows: _Rows, norm: nn.Module, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Pre-norm attention with the module's own projections; returns its output and keys (B, H, T, hd)."""
    batch, length, _ = x.shape
    hidden = norm(rows.pack(x))

    def heads(projection: nn.Module) -> Tensor:
        return rows.unpack(projection(hidden)).view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)

    queries, keys, values = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias, scale=attn.scale)
    out = out.transpose(1, 2).reshape(batch, length, -1)
    return rows.unpack(attn.out_proj(rows.pack(out))), keys


def run_layers(parts: EncoderParts, pixel_values: Tensor, num_layers: int, policy: MergePolicy) -> TokenState:
    """Embed, then run the first ``num_layers`` layers with DToMe; returns the padded merged batch."""
    state = initial_state(parts.embed(pixel_values))
    merged = False  # until something merges, every size is 1 and there is no padding: no bias, no packing
    for index, layer in enumerate(parts.layers[:num_layers]):
        rows = _Rows(state.sizes if merged else None)
        bias = attention_bias(state.sizes, state.x.dtype) if merged else None
        attended, keys = _self_attention(layer.self_attn, state.x, rows, layer.layer_norm1, bias)
        state = dataclasses.replace(state, x=state.x + attended)
        if policy.active(index):
            edges = bipartite_edges(keys.mean(dim=1), state.sizes, parts.num_protected)
            merge = policy.choose(index, edges)
            if bool(merge.any()):
                state = merge_tokens(state, edges, merge)
                merged = True
                rows = _Rows(state.sizes)
        update = rows.unpack(layer.mlp(layer.layer_norm2(rows.pack(state.x))))
        state = dataclasses.replace(state, x=state.x + update)
    return state


def split_images(state: TokenState, drop_first: bool = False) -> list[MergedImage]:
    """Cut the padded batch into per-image results; ``drop_first`` removes a protected CLS row and position."""
    images = []
    for x, sizes, mapping, count in zip(state.x, state.sizes, state.mapping, state.num_rows.tolist()):
        start = 1 if drop_first else 0
        images.append(
            MergedImage(features=x[start:count], sizes=sizes[start:count].long(), mapping=mapping[start:] - start)
        )
    return images
