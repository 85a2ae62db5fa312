"""DToMe's merge step as pure functions over a batch of images whose token counts differ.

A batch is held packed: the real rows of all images, image after image, with no padding, so that the
row-wise work of a ViT layer (norms, projections, MLP) is spent on real tokens only. Only attention and the
matching need a padded (B, T, ...) view, which ``TokenState.to_padded`` makes (and which is a free reshape
while every image has the same count).

    x        (M, D)  the rows;
    sizes    (M,)    how many original positions each row stands for;
    lengths  B ints  rows per image;
    mapping  (B, N)  for every original position, the row (within its image) that stands for it.

Rows keep the relative order of the positions they started from ("positional" order, the default), so a
protected prefix (CLIP's CLS token) stays in front and the alternate A/B split of a row depends only on its
own image. DyMU's own code (ToMe's) instead rebuilds each image as [A rows left unmerged, by descending
cosine of their best edge] + [B rows] ("authors" order), and the next layer splits that order alternately;
``merge_tokens(order="authors")`` does the same, for thresholds calibrated with their code. It is their
algorithm and order, not their rounding: on a shallow encoder it gives the same partitions as a literal
float64 reference of their algorithm, on a deep one (27 layers) the partitions drift apart after a few
merging layers, wherever two edge scores lie closer than float32 rounding, as the reference itself drifts
between float32 and float64 (``bench/merge_order.py --reference``). Both orders merge the same edges up to
the first layer that merges; the partitions differ after it, the token counts only a little. Positional
stays the default: a row's A/B side then depends on where its patches are, not on rounding in the previous
layer's scores, and the result reads in patch order.

One merge step (per ViT layer, after the attention residual): the layer's keys, averaged over heads, are
the similarity metric. Even rows form set A, odd rows set B; each A row gets one edge to its most similar B
row (cosine). A policy picks which edges merge: a threshold (``scores > tau``, inference) or the batch's top
edges (calibration). A merged row is the size-weighted mean of its members and its size is their sum.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dymu.presets import MERGE_ORDERS


@dataclass
class TokenState:
    """Packed rows of a batch, with sizes, per-image counts and the position -> row mapping."""

    x: Tensor
    sizes: Tensor
    lengths: list[int]
    mapping: Tensor

    @property
    def uniform(self) -> bool:
        """Every image has the same number of rows, so the padded view is a plain reshape."""
        return len(set(self.lengths)) == 1

    def merged(self) -> list[bool]:
        """Per image: has anything merged yet (fewer rows than positions)?"""
        return [length < self.mapping.shape[1] for length in self.lengths]

    def row_mask(self) -> Tensor:
        """(B, T) True where the padded view holds a real row."""
        slots = torch.arange(max(self.lengths), device=self.x.device)
        return slots < torch.tensor(self.lengths, device=self.x.device)[:, None]

    def to_padded(self, rows: Tensor) -> Tensor:
        """(M, ...) rows -> (B, T, ...) with zeros after each image's last row."""
        shape = (len(self.lengths), max(self.lengths), *rows.shape[1:])
        if self.uniform:
            return rows.view(shape)
        padded = rows.new_zeros(shape)
        padded[self.row_mask()] = rows
        return padded

    def to_packed(self, padded: Tensor) -> Tensor:
        """(B, T, ...) -> (M, ...), dropping the padding."""
        return padded.flatten(0, 1) if self.uniform else padded[self.row_mask()]

    def offsets(self) -> Tensor:
        """(B,) index of each image's first row."""
        lengths = torch.tensor(self.lengths, device=self.x.device)
        return lengths.cumsum(0) - lengths


@dataclass
class Edges:
    """One candidate merge per A row (even rows): its best B row (odd rows) and their cosine.

    scores:  (B, TA) cosine of each edge; -inf where the A row may not merge (padding, protected, over the cap).
    targets: (B, TA) index into the B rows (row ``2 * target + 1``).
    authors_rank: (B, TA) the rank of each A row in DyMU's own order of unmerged A rows: by descending
        cosine of its best edge, or by position when a protected CLS row must stay first (their code sorts
        those back). None: rank by ``scores``.
    """

    scores: Tensor
    targets: Tensor
    authors_rank: Tensor | None = None


def initial_state(x: Tensor) -> TokenState:
    """Every token of ``x`` (B, T, D) stands for its own position."""
    batch, length, dim = x.shape
    return TokenState(
        x=x.reshape(batch * length, dim),
        sizes=torch.ones(batch * length, device=x.device, dtype=torch.float32),
        lengths=[length] * batch,
        mapping=torch.arange(length, device=x.device).expand(batch, length).contiguous(),
    )


def attention_bias(sizes: Tensor, dtype: torch.dtype) -> Tensor:
    """Proportional attention as an additive SDPA mask (B, 1, 1, T) from padded sizes (B, T).

    log(size) on each key makes a merged key weigh as much as the keys it replaced; padding (size 0)
    gets log 0 = -inf.
    """
    return sizes.log().to(dtype)[:, None, None, :]


def bipartite_edges(
    metric: Tensor, sizes: Tensor, num_protected: int = 0, segments: Tensor | None = None
) -> Edges:
    """Each A row's best edge to a B row, by cosine of the padded ``metric`` (B, T, C).

    ``sizes`` (B, T) marks padding with 0. Padding rows and the first ``num_protected`` rows take no part.
    ``segments`` (B, T), optional: a row may only merge with a row of the same segment (Qwen2.5-VL's
    attention windows). At most half of the rows that may merge get a finite score (the best-scoring
    ones), so no layer more than halves an image.
    """
    batch, length, _ = metric.shape
    position = torch.arange(length, device=metric.device)
    mergeable = (sizes > 0) & (position >= num_protected)
    open_a, open_b = mergeable[:, ::2], mergeable[:, 1::2]
    if length < 2:
        scores = torch.full(open_a.shape, float("-inf"), device=metric.device)
        targets = torch.zeros_like(open_a, dtype=torch.long)
        return Edges(scores=scores, targets=targets, authors_rank=targets.clone())

    metric = F.normalize(metric.float(), dim=-1)
    similarity = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    if segments is not None:
        similarity.masked_fill_(segments[:, ::2, None] != segments[:, None, 1::2], float("-inf"))
    if not bool(open_b.all()):
        similarity.masked_fill_(~open_b[:, None, :], float("-inf"))
    scores, targets = similarity.max(dim=-1)
    # Rounding can push the cosine of identical keys just over 1; tau = 1.0 must still mean "never merge".
    scores = scores.clamp(max=1.0).masked_fill(~open_a, float("-inf"))

    # Rank the edges of each image to enforce the cap; there are at most ~T/2 of them, so this is cheap.
    cap = mergeable.sum(dim=1, keepdim=True) // 2
    rank = scores.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    authors_rank = rank if num_protected == 0 else position[: open_a.shape[1]].expand_as(rank)
    scores = scores.masked_fill(rank >= cap, float("-inf"))
    return Edges(scores=scores, targets=targets, authors_rank=authors_rank)


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


def merge_tokens(state: TokenState, edges: Edges, merge: Tensor, order: str = "positional") -> TokenState:
    """Merge each chosen A row into its B row (size-weighted mean) and drop it.

    Work is one gather of the surviving rows plus arithmetic on the merged rows only; rows that absorb
    nothing are copied bit for bit. The mapping follows: positions of a merged A row now point at the row
    that absorbed it. ``order`` says how the surviving rows are arranged (see the module's docstring).
    """
    if order not in MERGE_ORDERS:
        raise ValueError(f"unknown merge order {order!r}; expected one of {MERGE_ORDERS}")
    real = state.row_mask()
    keep = real.clone()
    keep[:, ::2] &= ~merge
    lengths = keep.sum(dim=1)
    if order == "positional":
        new_row = keep.cumsum(dim=1) - 1  # row within its image after merging
        kept = keep[real].nonzero().squeeze(1)  # index_select copies rows faster than boolean indexing
    else:
        new_row, kept = _authors_order(state, edges, keep, lengths)
    destination = new_row.clone()
    destination[:, ::2] = torch.where(merge, new_row[:, 1::2].gather(1, edges.targets), new_row[:, ::2])
    mapping = destination.gather(1, state.mapping)

    merged = TokenState(
        x=state.x.index_select(0, kept),
        sizes=state.sizes.index_select(0, kept),
        lengths=lengths.tolist(),
        mapping=mapping,
    )
    image, a = merge.nonzero(as_tuple=True)
    source = state.offsets()[image] + 2 * a
    target = merged.offsets()[image] + new_row[image, 2 * edges.targets[image, a] + 1]
    rows, slot = target.unique(return_inverse=True)

    # Weighted sums in float32: bf16 would lose the small contributions of large groups.
    moved = state.sizes[source]
    total = merged.sizes[rows].index_add(0, slot, moved)
    weighted = (merged.x[rows].float() * merged.sizes[rows, None]).index_add_(
        0, slot, state.x[source].float() * moved[:, None]
    )
    merged.x[rows] = (weighted / total[:, None]).to(merged.x.dtype)
    merged.sizes[rows] = total
    return merged


def _authors_order(state: TokenState, edges: Edges, keep: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """DyMU's row order after a merge: the surviving A rows by ``edges.authors_rank``, then the B rows.

    Returns each slot's row within its image after merging (meaningful where ``keep``) and the packed
    indices of the surviving rows in their new order.
    """
    batch, length = keep.shape
    slot = torch.arange(length, device=keep.device).expand(batch, length)
    rank = edges.authors_rank
    if rank is None:
        rank = edges.scores.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    key = slot + length  # B rows after every A row, in their current order
    key[:, ::2] = rank
    key = key.masked_fill(~keep, 2 * length)  # dropped and padding slots sort last
    order = key.argsort(dim=1, stable=True)
    new_row = order.argsort(dim=1)
    kept = (state.offsets()[:, None] + order)[slot < lengths[:, None]]
    return new_row, kept
