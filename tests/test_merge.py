"""DToMe's pure merge functions: edges, thresholds, batch-level selection, size-weighted merging, compaction."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dymu.merge import (
    Edges,
    TokenState,
    attention_bias,
    batch_top_merges,
    bipartite_edges,
    initial_state,
    merge_tokens,
    threshold_merges,
)


def _state(x: torch.Tensor, sizes: torch.Tensor) -> TokenState:
    batch, length, _ = x.shape
    return TokenState(x=x, sizes=sizes, mapping=torch.arange(length).expand(batch, length).contiguous())


def _reference_merge(x, sizes, mapping, targets, merge):
    """One image, the slow obvious way: groups as Python lists."""
    rows = [[i] for i in range(len(sizes)) if sizes[i] > 0]
    owner = {i: i for i in range(len(sizes))}
    for a, (target, chosen) in enumerate(zip(targets.tolist(), merge.tolist())):
        if chosen:
            owner[2 * a] = 2 * target + 1
    groups: dict[int, list[int]] = {}
    for row in [r[0] for r in rows]:
        groups.setdefault(owner[row], []).append(row)
    kept = sorted(groups)
    feats = torch.stack([
        sum(x[m].double() * sizes[m].double() for m in groups[k]) / sum(float(sizes[m]) for m in groups[k])
        for k in kept
    ])
    new_sizes = torch.tensor([sum(float(sizes[m]) for m in groups[k]) for k in kept])
    new_mapping = torch.tensor([kept.index(owner[int(r)]) for r in mapping])
    return feats, new_sizes, new_mapping


def test_initial_state_is_identity():
    state = initial_state(torch.randn(2, 5, 3))
    assert torch.equal(state.sizes, torch.ones(2, 5))
    assert torch.equal(state.mapping, torch.arange(5).expand(2, 5))
    assert state.num_rows.tolist() == [5, 5]


def test_edges_pick_the_most_similar_odd_row():
    # rows 0,2 (set A) are copies of rows 3,1 (set B); row 4 is unlike anything
    base = torch.eye(4)
    metric = torch.stack([base[0], base[1], base[1], base[0], base[2] + base[3]])[None]
    edges = bipartite_edges(metric, torch.ones(1, 5))
    assert edges.targets[0, :2].tolist() == [1, 0]  # row 0 -> B index 1 (row 3), row 2 -> B index 0 (row 1)
    assert edges.scores[0, :2].tolist() == pytest.approx([1.0, 1.0])
    # cap: 5 open rows -> at most 2 merges, so the weakest edge (row 4's) is dropped
    assert edges.scores[0, 2].item() == float("-inf")


def test_edges_respect_protected_rows_and_padding():
    metric = torch.ones(1, 6, 4)  # everything identical: every edge scores 1
    sizes = torch.tensor([[1.0, 1, 1, 1, 0, 0]])
    edges = bipartite_edges(metric, sizes, num_protected=2)
    finite = torch.isfinite(edges.scores[0])
    assert finite.tolist() == [False, True, False]  # row 0 protected, row 2 open, row 4 padding
    assert edges.targets[0, 1].item() == 1  # row 2 may only go to row 3: row 1 is protected, row 5 padding


def test_at_most_half_of_the_tokens_merge_per_layer():
    metric = torch.ones(3, 9, 4)
    sizes = torch.ones(3, 9)
    edges = bipartite_edges(metric, sizes, num_protected=1)
    merged = threshold_merges(edges, -1.0).sum(dim=1)
    assert merged.tolist() == [4, 4, 4]  # 8 mergeable rows -> 4 merges


def test_cosine_of_identical_keys_never_exceeds_one():
    metric = torch.randn(2, 50, 16).repeat_interleave(2, dim=1) * 1e3  # every A row has an exact twin in B
    edges = bipartite_edges(metric, torch.ones(2, 100))
    assert edges.scores.max().item() <= 1.0
    assert not threshold_merges(edges, 1.0).any()


def test_threshold_is_strict():
    edges = Edges(scores=torch.tensor([[0.5, 0.7, float("-inf")]]), targets=torch.zeros(1, 3, dtype=torch.long))
    assert threshold_merges(edges, 0.7).tolist() == [[False, False, False]]
    assert threshold_merges(edges, 0.6).tolist() == [[False, True, False]]


def test_batch_top_merges_takes_the_best_edges_of_the_whole_batch():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.95, 0.2, float("-inf")]])
    edges = Edges(scores=scores, targets=torch.zeros(2, 3, dtype=torch.long))
    merge, tau = batch_top_merges(edges, 3)
    assert merge.tolist() == [[True, True, False], [True, False, False]]
    assert tau == pytest.approx(0.2)  # the best edge left
    merge, tau = batch_top_merges(edges, 10)  # more than available: all finite edges, no tau
    assert merge.sum().item() == 5 and tau is None
    merge, tau = batch_top_merges(edges, 0)
    assert not merge.any() and tau == pytest.approx(0.95)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_matches_a_reference_implementation(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, length, dim = 3, 11, 5
    x = torch.randn(batch, length, dim, generator=gen)
    sizes = torch.randint(1, 4, (batch, length), generator=gen).float()
    sizes[2, 8:] = 0  # image 2 is shorter: padded
    x[2, 8:] = 0
    state = _state(x, sizes)
    state.mapping = torch.randint(0, 8, (batch, 20), generator=gen)  # positions pointing at real rows
    edges = bipartite_edges(torch.randn(batch, length, 4, generator=gen), sizes)
    merge = threshold_merges(edges, 0.0)
    assert merge.any()

    merged = merge_tokens(state, edges, merge)
    for b in range(batch):
        feats, new_sizes, new_mapping = _reference_merge(x[b], sizes[b], state.mapping[b], edges.targets[b], merge[b])
        count = len(new_sizes)
        assert merged.num_rows[b].item() == count
        assert torch.allclose(merged.x[b, :count].double(), feats, atol=1e-6)
        assert torch.equal(merged.sizes[b, :count], new_sizes.float())
        assert torch.equal(merged.mapping[b], new_mapping)
        assert (merged.sizes[b, count:] == 0).all() and (merged.x[b, count:] == 0).all()
        assert merged.sizes[b].sum() == sizes[b].sum()


def test_mapping_stays_a_partition_over_many_merges():
    gen = torch.Generator().manual_seed(0)
    state = initial_state(torch.randn(2, 64, 8, generator=gen))
    for _ in range(5):
        edges = bipartite_edges(torch.randn(*state.x.shape[:2], 4, generator=gen), state.sizes)
        state = merge_tokens(state, edges, threshold_merges(edges, 0.2))
    for b in range(2):
        rows = state.num_rows[b].item()
        counts = torch.bincount(state.mapping[b], minlength=rows)
        assert len(counts) == rows and (counts > 0).all()
        assert torch.equal(counts.float(), state.sizes[b, :rows])
    assert state.num_rows.max().item() < 64


def test_rows_that_absorb_nothing_are_copied_exactly():
    x = torch.randn(1, 6, 4, dtype=torch.bfloat16)
    sizes = torch.tensor([[1.0, 3.0, 1.0, 7.0, 1.0, 1.0]])
    edges = Edges(scores=torch.zeros(1, 3), targets=torch.tensor([[0, 0, 0]]))
    merge = torch.tensor([[False, True, False]])  # row 2 -> row 1
    merged = merge_tokens(_state(x, sizes), edges, merge)
    assert merged.x.dtype == torch.bfloat16
    assert torch.equal(merged.x[0, [0, 2, 3, 4]], x[0, [0, 3, 4, 5]])
    expected = (x[0, 1].float() * 3 + x[0, 2].float()) / 4
    assert torch.allclose(merged.x[0, 1].float(), expected, atol=1e-2)
    assert merged.sizes[0].tolist() == [1.0, 4.0, 7.0, 1.0, 1.0]


def test_proportional_attention_equals_attention_over_the_unmerged_copies():
    """A key of size n must weigh exactly like n identical keys: that is what log(size) buys."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 8, generator=gen)
    k = torch.randn(1, 2, 3, 8, generator=gen)
    v = torch.randn(1, 2, 3, 8, generator=gen)
    sizes = torch.tensor([[2.0, 1.0, 3.0]])
    merged = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias(sizes, q.dtype))
    repeats = torch.tensor([2, 1, 3])
    expanded = F.scaled_dot_product_attention(
        q, k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
    )
    assert torch.allclose(merged, expanded, atol=1e-6)


def test_padding_keys_get_no_attention():
    bias = attention_bias(torch.tensor([[1.0, 2.0, 0.0]]), torch.bfloat16)
    assert bias.shape == (1, 1, 1, 3) and bias.dtype == torch.bfloat16
    assert bias[0, 0, 0, 0].item() == 0.0
    assert bias[0, 0, 0, 1].item() == pytest.approx(math.log(2), abs=1e-2)
    assert bias[0, 0, 0, 2].item() == float("-inf")
