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


def _state(rows: list[torch.Tensor], sizes: list[torch.Tensor], mapping: torch.Tensor) -> TokenState:
    """A packed state from per-image rows and sizes."""
    return TokenState(x=torch.cat(rows), sizes=torch.cat(sizes), lengths=[len(r) for r in rows], mapping=mapping)


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
    x = torch.randn(2, 5, 3)
    state = initial_state(x)
    assert torch.equal(state.x, x.reshape(10, 3)) and state.lengths == [5, 5]
    assert torch.equal(state.sizes, torch.ones(10))
    assert torch.equal(state.mapping, torch.arange(5).expand(2, 5))
    assert torch.equal(state.to_padded(state.x), x)


def test_padded_and_packed_views():
    state = _state([torch.ones(3, 2), 2 * torch.ones(1, 2)], [torch.ones(3), torch.ones(1)], torch.zeros(2, 3, dtype=torch.long))
    padded = state.to_padded(state.x)
    assert padded.shape == (2, 3, 2)
    assert padded[:, :, 0].tolist() == [[1, 1, 1], [2, 0, 0]]
    assert torch.equal(state.to_packed(padded), state.x)
    assert state.to_padded(state.sizes).tolist() == [[1, 1, 1], [1, 0, 0]]
    assert state.offsets().tolist() == [0, 3]
    assert state.merged() == [False, True]  # 3 positions each: image 1 stands for its with 1 row


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
    lengths, dim = [11, 11, 8], 5
    rows = [torch.randn(n, dim, generator=gen) for n in lengths]
    sizes = [torch.randint(1, 4, (n,), generator=gen).float() for n in lengths]
    mapping = torch.stack([torch.randint(0, n, (20,), generator=gen) for n in lengths])
    state = _state(rows, sizes, mapping)
    edges = bipartite_edges(torch.randn(3, 11, 4, generator=gen), state.to_padded(state.sizes))
    merge = threshold_merges(edges, 0.0)
    assert merge.any()

    merged = merge_tokens(state, edges, merge)
    per_image = zip(merged.x.split(merged.lengths), merged.sizes.split(merged.lengths), merged.mapping)
    for b, (x, s, m) in enumerate(per_image):
        feats, new_sizes, new_mapping = _reference_merge(rows[b], sizes[b], mapping[b], edges.targets[b], merge[b])
        assert merged.lengths[b] == len(new_sizes)
        assert torch.allclose(x.double(), feats, atol=1e-6)
        assert torch.equal(s, new_sizes.float())
        assert torch.equal(m, new_mapping)
        assert s.sum() == sizes[b].sum()


def test_mapping_stays_a_partition_over_many_merges():
    gen = torch.Generator().manual_seed(0)
    state = initial_state(torch.randn(2, 64, 8, generator=gen))
    for _ in range(5):
        metric = torch.randn(2, max(state.lengths), 4, generator=gen)
        edges = bipartite_edges(metric, state.to_padded(state.sizes))
        state = merge_tokens(state, edges, threshold_merges(edges, 0.2))
    assert len(set(state.lengths)) > 1  # the images merged by different amounts
    for mapping, sizes in zip(state.mapping, state.sizes.split(state.lengths)):
        counts = torch.bincount(mapping, minlength=len(sizes))
        assert len(counts) == len(sizes) and (counts > 0).all()
        assert torch.equal(counts.float(), sizes)
    assert max(state.lengths) < 64


def test_rows_that_absorb_nothing_are_copied_exactly():
    x = torch.randn(6, 4, dtype=torch.bfloat16)
    sizes = torch.tensor([1.0, 3.0, 1.0, 7.0, 1.0, 1.0])
    edges = Edges(scores=torch.zeros(1, 3), targets=torch.tensor([[0, 0, 0]]))
    merge = torch.tensor([[False, True, False]])  # row 2 -> row 1
    merged = merge_tokens(_state([x], [sizes], torch.arange(6)[None]), edges, merge)
    assert merged.x.dtype == torch.bfloat16
    assert torch.equal(merged.x[[0, 2, 3, 4]], x[[0, 3, 4, 5]])
    expected = (x[1].float() * 3 + x[2].float()) / 4
    assert torch.allclose(merged.x[1].float(), expected, atol=1e-2)
    assert merged.sizes.tolist() == [1.0, 4.0, 7.0, 1.0, 1.0]
    assert merged.mapping.tolist() == [[0, 1, 1, 2, 3, 4]]


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
