"""A slow, literal DToMe layer written straight from the algorithm's description (shared/DESIGN.md), for tests.

Everything is float64 Python loops over rows and plain lists of positions: no packing, no padding, no
masks, so that it can be read against the description line by line. Per ViT layer:

    x = x + attention(LN1(x)), where each key j gets + log(size_j) on its logits (proportional attention);
    metric = the layer's attention keys averaged over heads, L2-normalised;
    A = even rows, B = odd rows (a protected CLS row never merges); each A row's edge goes to its most
        similar B row (cosine); every edge scoring > tau merges, at most half the mergeable rows, best first;
    a merged row is the size-weighted mean of its members, its size their sum, its positions their union;
    x = x + MLP(LN2(x)) on the merged rows.

Row order after a merge: "positional" keeps rows in the order they had (a B row that absorbs keeps its
place); "authors" is DyMU's own code (ToMe's): [A rows left unmerged, by descending score of their edge
(sorted back by position when there is a CLS token)] then [all B rows, in order], and no change at all in
a layer that merges nothing.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Rows:
    """One image: feature rows, their sizes, and the original positions each row stands for."""

    x: list[torch.Tensor]
    sizes: list[float]
    groups: list[list[int]]


def double_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).double()


def attention(layer: nn.Module, rows: Rows) -> list[torch.Tensor]:
    """Pre-norm self-attention with log(size) on every key, one query row and one head at a time."""
    attn = layer.self_attn
    h = [layer.layer_norm1(x) for x in rows.x]
    q = [attn.q_proj(v).view(attn.num_heads, attn.head_dim) for v in h]
    k = torch.stack([attn.k_proj(v).view(attn.num_heads, attn.head_dim) for v in h])
    v = torch.stack([attn.v_proj(v).view(attn.num_heads, attn.head_dim) for v in h])
    log_sizes = torch.tensor([math.log(s) for s in rows.sizes], dtype=k.dtype)
    out = []
    for i in range(len(rows.x)):
        heads = []
        for head in range(attn.num_heads):
            logits = k[:, head] @ q[i][head] * attn.scale + log_sizes
            weights = (logits - logits.max()).exp()
            heads.append((weights / weights.sum()) @ v[:, head])
        out.append(attn.out_proj(torch.cat(heads)))
    return out


def keys_mean_over_heads(layer: nn.Module, x: list[torch.Tensor]) -> list[torch.Tensor]:
    attn = layer.self_attn
    return [attn.k_proj(layer.layer_norm1(row)).view(attn.num_heads, attn.head_dim).mean(dim=0) for row in x]


def edges(metric: list[torch.Tensor], protected: int) -> dict[int, tuple[float, int]]:
    """Each mergeable A row (even index) -> (cosine of its best edge, the B row (odd index) it goes to)."""
    unit = [m / m.norm() for m in metric]
    b_rows = [b for b in range(1, len(unit), 2) if b >= protected]
    if not b_rows:
        return {}
    b_unit = torch.stack([unit[b] for b in b_rows])
    out = {}
    for a in range(0, len(unit), 2):
        if a < protected:
            continue
        scores = b_unit @ unit[a]
        best = int(scores.argmax())
        out[a] = (float(scores[best]), b_rows[best])
    return out


def layer_forward(layer: nn.Module, rows: Rows, tau: float, protected: int = 0, order: str = "positional"
                  ) -> tuple[Rows, dict[int, tuple[float, int]]]:
    """One DToMe layer on one image; returns the new rows and the edges it considered."""
    attended = attention(layer, rows)
    x = [row + out for row, out in zip(rows.x, attended)]
    found = edges(keys_mean_over_heads(layer, rows.x), protected)
    cap = (len(x) - protected) // 2
    passing = sorted((a for a in found if found[a][0] > tau), key=lambda a: -found[a][0])[:cap]

    absorbed: dict[int, list[int]] = {}
    for a in passing:
        absorbed.setdefault(found[a][1], []).append(a)
    merged_away = set(passing)
    new_x, new_sizes, new_groups = {}, {}, {}
    for r in range(len(x)):
        if r in merged_away:
            continue
        members = [r] + absorbed.get(r, [])
        size = sum(rows.sizes[m] for m in members)
        new_x[r] = sum(x[m] * rows.sizes[m] for m in members) / size
        new_sizes[r] = size
        new_groups[r] = sorted(p for m in members for p in rows.groups[m])

    if order == "positional" or not passing:  # their code returns at once when nothing merges
        survivors = sorted(new_x)
    else:
        unmerged_a = [r for r in range(0, len(x), 2) if r not in merged_away]
        if protected:
            unmerged_a.sort()
        else:
            unmerged_a.sort(key=lambda a: -found[a][0])
        survivors = unmerged_a + list(range(1, len(x), 2))
    out = Rows([new_x[r] for r in survivors], [new_sizes[r] for r in survivors], [new_groups[r] for r in survivors])
    out.x = [row + layer.mlp(layer.layer_norm2(row)) for row in out.x]
    return out, found


def partition(groups: list[list[int]]) -> set[frozenset[int]]:
    return {frozenset(g) for g in groups}
