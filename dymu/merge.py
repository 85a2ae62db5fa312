"""DToMe's merge step as pure functions over a padded batch of tokens.

A batch of B images is held padded to a common length T:

    x        (B, T, D)  the tokens;
    sizes    (B, T)     how many original positions each row stands for; 0 marks a padding row;
    mapping  (B, N)     for every original position, the row that currently stands for it.

Real rows always come first and keep the relative order of the positions they started from, so a
protected prefix (CLIP's CLS token) stays at the front and the alternate A/B split of a row depends only on
its own image, never on how much padding the batch needed.

One merge step (per ViT layer, after the attention residual): the layer's keys, averaged over heads, are
the similarity metric. Even rows form set A, odd rows set B; each A row gets one edge to its most similar B
row (cosine). A policy picks which edges merge: a threshold (``scores > tau``, inference) or the batch's top
edges (calibration). Merged rows become the size-weighted mean of their members and their sizes add up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class TokenState:
    """Padded tokens of a batch with their sizes and the position -> row mapping (see module docstring)."""

    x: Tensor
    sizes: Tensor
    mapping: Tensor

    @property
    def num_rows(self) -> Tensor:
        """(B,) real rows per image."""
        return (self.sizes > 0).sum(dim=1)


@dataclass
class Edges:
    """One candidate merge per A row (even rows): its best B row (odd rows) and their cosine.

    scores:  (B, TA) cosine of each edge; -inf where the A row may not merge (padding, protected, over the cap).
    targets: (B, TA) index into the B rows (row ``2 * target + 1``).
    """

    scores: Tensor
    targets: Tensor


def initial_state(x: Tensor) -> TokenState:
    """Every token stands for its own position."""
    batch, length, _ = x.shape
    sizes = torch.ones(batch, length, device=x.device, dtype=torch.float32)
    mapping = torch.arange(length, device=x.device).expand(batch, length).contiguous()
    return TokenState(x=x, sizes=sizes, mapping=mapping)


def attention_bias(sizes: Tensor, dtype: torch.dtype) -> Tensor:
    """Proportional attention as an additive SDPA mask (B, 1, 1, T): log(size) on each key.

    A merged key then weighs as much as the keys it replaced; padding (size 0) gets log 0 = -inf.
    """
    return sizes.log().to(dtype)[:, None, None, :]


def bipartite_edges(metric: Tensor, sizes: Tensor, num_protected: int = 0) -> Edges:
    """Each A row's best edge to a B row, by cosine of ``metric`` (B, T, C).

    Padding rows and the first ``num_protected`` rows take no part. At most half of the rows that may merge
    get a finite score (the best-scoring ones), so no layer more than halves an image.
    """
    batch, length, _ = metric.shape
    position = torch.arange(length, device=metric.device)
    mergeable = (sizes > 0) & (position >= num_protected)
    open_a, open_b = mergeable[:, ::2], mergeable[:, 1::2]
    if length < 2:
        scores = torch.full(open_a.shape, float("-inf"), device=metric.device)
        return Edges(scores=scores, targets=torch.zeros_like(open_a, dtype=torch.long))

    metric = F.normalize(metric.float(), dim=-1)
    similarity = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    # Rounding can push the cosine of identical keys just over 1; tau = 1.0 must still mean "never merge".
    similarity.clamp_(max=1.0)
    similarity.masked_fill_(~open_b[:, None, :], float("-inf"))
    scores, targets = similarity.max(dim=-1)
    scores = scores.masked_fill(~open_a, float("-inf"))

    # Rank the edges of each image to enforce the cap; there are at most ~T/2 of them, so this is cheap.
    cap = mergeable.sum(dim=1, keepdim=True) // 2
    rank = scores.argsort(dim=1, descending=True).argsort(dim=1)
    scores = scores.masked_fill(rank >= cap, float("-inf"))
    return Edges(scores=scores, targets=targets)


def threshold_merges(edges: Edges, tau: float) -> Tensor:
    """Inference: merge every edge whose cosine is strictly above ``tau`` (tau = 1.0 merges nothing)."""
    return edges.scores > tau


def batch_top_merges(edges: Edges, num_merges: int) -> tuple[Tensor, float | None]:
    """Calibration: merge the ``num_merges`` best edges of the whole batch, wherever they are.

    Simple images hold most of the best edges, so they give more of the batch's merges. Returns the merge
    mask and tau_batch, the score of the best edge left unmerged (None if no edge is left).
    """
    flat = edges.scores.flatten()
    available = int(torch.isfinite(flat).sum())
    num_merges = max(0, min(num_merges, available))
    best = flat.topk(min(num_merges + 1, flat.numel())).indices
    merge = torch.zeros_like(flat, dtype=torch.bool)
    merge[best[:num_merges]] = True
    tau = float(flat[best[num_merges]]) if num_merges < available else None
    return merge.view_as(edges.scores), tau


def merge_tokens(state: TokenState, edges: Edges, merge: Tensor) -> TokenState:
    """Merge each chosen A row into its B row (size-weighted mean) and compact the batch.

    Rows that absorb nothing are copied bit for bit. The new length is the longest image's row count;
    shorter images are padded with size-0 rows. The mapping follows: positions of a merged A row now point
    at the row that absorbed it.
    """
    x, sizes = state.x, state.sizes
    batch, length, dim = x.shape
    size_a, size_b = sizes[:, ::2], sizes[:, 1::2]
    moved = size_a * merge

    # Weighted sums in float32: bf16 would lose the small contributions of large groups.
    new_size_b = size_b.scatter_add(1, edges.targets, moved)
    sum_b = (x[:, 1::2].float() * size_b[..., None]).scatter_add(
        1, edges.targets[..., None].expand(-1, -1, dim), x[:, ::2].float() * moved[..., None]
    )
    grew = new_size_b > size_b
    mean_b = (sum_b / new_size_b.clamp_min(1.0)[..., None]).to(x.dtype)
    merged_x = x.clone()
    merged_x[:, 1::2] = torch.where(grew[..., None], mean_b, x[:, 1::2])
    merged_sizes = sizes.clone()
    merged_sizes[:, 1::2] = new_size_b
    merged_sizes[:, ::2] = size_a.masked_fill(merge, 0.0)

    keep = merged_sizes > 0
    new_row = keep.cumsum(dim=1) - 1
    destination = new_row.clone()
    destination[:, ::2] = torch.where(merge, new_row[:, 1::2].gather(1, edges.targets), new_row[:, ::2])
    mapping = destination.gather(1, state.mapping)

    new_length = int(keep.sum(dim=1).max())
    flat_index = (torch.arange(batch, device=x.device)[:, None] * new_length + new_row)[keep]
    compact_x = x.new_zeros(batch * new_length, dim)
    compact_x[flat_index] = merged_x[keep]
    compact_sizes = sizes.new_zeros(batch * new_length)
    compact_sizes[flat_index] = merged_sizes[keep]
    return TokenState(
        x=compact_x.view(batch, new_length, dim),
        sizes=compact_sizes.view(batch, new_length),
        mapping=mapping,
    )
