"""The fast DToMe (dymu/merge.py, dymu/vision/runner.py with the SigLIP and CLIP adapters) against the slow
literal reference in tests/dtome_reference.py, on random rows and on real images, at several thresholds and
in both merge orders. Each of these would go red if the runner forgot log(size) in attention, merged after
the MLP, matched on hidden states instead of keys, or let an edge scoring exactly tau merge."""
from __future__ import annotations

import pytest
import torch

from dymu.merge import TokenState, initial_state
from dymu.vision import runner
from dymu.vision.encoder import DToMeEncoder, encoder_parts
from dymu.vision.load import VisionModel, load_vision_model
from dymu.vision.runner import ThresholdPolicy, run_layer
from tests import dtome_reference as ref
from tests.test_calibrate import natural_images

POSITIONS = 64  # per image in the random-row tests


@pytest.fixture(scope="module")
def towers(tiny_ov, tiny_llava) -> dict[str, VisionModel]:
    return {
        "siglip": load_vision_model(str(tiny_ov), device="cpu", dtype="float32"),
        "clip": load_vision_model(str(tiny_llava), device="cpu", dtype="float32"),
    }


def random_images(width: int, counts: list[int], protected: int, seed: int) -> tuple[TokenState, list[ref.Rows]]:
    """A packed batch of images with ``counts`` rows each over POSITIONS positions, rows of random sizes
    (a protected CLS row has size 1), and the same images as reference rows."""
    gen = torch.Generator().manual_seed(seed)
    images, xs, sizes, mappings = [], [], [], []
    for count in counts:
        cuts = torch.randperm(POSITIONS - protected - 1, generator=gen)[: count - protected - 1] + 1
        bounds = [0] + sorted(cuts.tolist()) + [POSITIONS - protected]
        row_sizes = [1] * protected + [b - a for a, b in zip(bounds, bounds[1:])]
        x = torch.randn(count, width, generator=gen) * 2
        groups, start = [], 0
        for size in row_sizes:
            groups.append(list(range(start, start + size)))
            start += size
        images.append(ref.Rows([row.double() for row in x], [float(s) for s in row_sizes], groups))
        xs.append(x)
        sizes.append(torch.tensor(row_sizes, dtype=torch.float32))
        mappings.append(torch.arange(count).repeat_interleave(sizes[-1].long()))
    state = TokenState(x=torch.cat(xs), sizes=torch.cat(sizes), lengths=list(counts), mapping=torch.stack(mappings))
    return state, images


def unpack(state: TokenState) -> list[ref.Rows]:
    """The fast state per image, rows in the order the state holds them."""
    images = []
    for x, sizes, mapping in zip(state.x.split(state.lengths), state.sizes.split(state.lengths), state.mapping):
        groups = [(mapping == r).nonzero().flatten().tolist() for r in range(x.shape[0])]
        images.append(ref.Rows(list(x), sizes.tolist(), groups))
    return images


def assert_same(fast: ref.Rows, slow: ref.Rows, atol: float = 1e-4) -> None:
    assert fast.groups == slow.groups  # same partition, rows in the same order
    assert fast.sizes == slow.sizes
    torch.testing.assert_close(torch.stack(fast.x).double(), torch.stack(slow.x), atol=atol, rtol=1e-4)


def thresholds_between(scores: list[float], margin: float = 1e-4) -> list[float]:
    """Taus halfway between neighbouring edge scores, at several quantiles, plus no merge (1.0) and
    merge-all-the-cap-allows (-1.0); each at least ``margin`` away from every score."""
    ordered = sorted(scores)
    taus = [1.0, -1.0]
    for quantile in (0.2, 0.5, 0.8):
        i = int(quantile * (len(ordered) - 1))
        while ordered[i + 1] - ordered[i] < 2 * margin:
            i += 1
        taus.append((ordered[i] + ordered[i + 1]) / 2)
    return taus


@pytest.mark.parametrize("order", ["positional", "authors"])
@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_one_layer_matches_the_reference_on_random_rows(towers, family, order):
    """Rows of sizes 1-10 (so log(size) matters), a batch of three images of different lengths (so padding
    and per-image attention are exercised), thresholds from no merge to the cap."""
    parts = encoder_parts(towers[family].tower)
    layer, protected = parts.layers[1], parts.num_protected
    slow_layer = ref.double_copy(layer)
    state, images = random_images(layer.self_attn.embed_dim, [41, 33, 40], protected, seed=len(family))
    with torch.no_grad():
        scores = [s for image in images for s, _ in ref.edges(ref.keys_mean_over_heads(slow_layer, image.x),
                                                                  protected).values()]
        merged_counts = []
        for tau in thresholds_between(scores):
            fast = unpack(run_layer(layer, state, 0, ThresholdPolicy([tau]), protected, order))
            for fast_image, image in zip(fast, images):
                slow, _ = ref.layer_forward(slow_layer, image, tau, protected, order)
                assert_same(fast_image, slow)
            merged_counts.append(sum(len(i.x) for i in fast))
    assert merged_counts[0] == 41 + 33 + 40 and len(set(merged_counts)) == len(merged_counts)


@pytest.mark.parametrize("order", ["positional", "authors"])
@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_every_layer_of_the_encoder_matches_the_reference_on_images(towers, family, order):
    """The whole tower on real-sized images (729 SigLIP patches, CLS + 576 CLIP patches), one image at a
    time as the authors' code runs it and as a batch, merging from the first layer on. In the authors'
    order this is what "same partitions as their algorithm" rests on: it holds on this 4-layer tower; on a
    27-layer one float rounding makes the partitions drift (`python -m bench.merge_order --reference`)."""
    vision = towers[family]
    parts = encoder_parts(vision.tower)
    slow_layers = [ref.double_copy(layer) for layer in parts.layers]
    pixels = vision.pixels(natural_images(2, seed=4))
    taus = [0.6, 0.7, 0.8, 0.75][: len(parts.layers)]
    encoder = DToMeEncoder(vision.tower, taus=taus, feature_layer=len(parts.layers), merge_order=order)
    with torch.no_grad():
        fast_batch = encoder.run(pixels, ThresholdPolicy(taus))
        for i in range(pixels.shape[0]):
            embedded = parts.embed(pixels[i : i + 1])[0].double()
            rows = ref.Rows(list(embedded), [1.0] * len(embedded), [[p] for p in range(len(embedded))])
            closest = 1.0
            for layer, tau in zip(slow_layers, taus):
                rows, found = ref.layer_forward(layer, rows, tau, parts.num_protected, order)
                closest = min([closest] + [abs(score - tau) for score, _ in found.values()])
            assert closest > 1e-5  # no edge so close to tau that float32 rounding could flip it
            assert len(rows.x) < 0.8 * len(embedded)
            single = encoder(pixels[i : i + 1])[0]
            for fast in (single, fast_batch[i]):
                assert ref.partition(rows.groups) == ref.partition(
                    [(fast.mapping == r).nonzero().flatten().tolist() for r in range(fast.num_tokens)]
                )
                by_first = sorted(range(len(rows.groups)), key=lambda r: rows.groups[r][0])
                expected = torch.stack([rows.x[r] for r in by_first])
                torch.testing.assert_close(fast.features.double(), expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_an_edge_scoring_exactly_tau_does_not_merge(towers, family, monkeypatch):
    """Inference merges scores strictly above tau, in the encoder itself (not only in a helper)."""
    vision = towers[family]
    seen = []

    def spy(*args, **kwargs):
        edges = original(*args, **kwargs)
        seen.append(edges.scores.clone())
        return edges

    original = runner.bipartite_edges
    monkeypatch.setattr(runner, "bipartite_edges", spy)
    pixels = vision.pixels(natural_images(1, seed=2))
    num_layers = vision.encoder().num_layers
    vision.encoder([0.99] + [1.0] * (num_layers - 1))(pixels)
    scores = seen[0][torch.isfinite(seen[0])]
    tau = float(scores.sort(descending=True).values[10])
    assert int((scores == tau).sum()) == 1
    merged = vision.encoder([tau] + [1.0] * (num_layers - 1))(pixels)[0]
    assert merged.num_tokens == vision.encoder().num_positions - 10  # the 11th best edge scores tau: kept


def test_two_merging_layers_in_a_row_match_the_reference(towers):
    """From single positions (sizes 1) through two merging layers: the second layer sees merged rows."""
    parts = encoder_parts(towers["siglip"].tower)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, POSITIONS, parts.layers[0].self_attn.embed_dim, generator=gen)
    state = initial_state(x)
    rows = ref.Rows(list(x[0].double()), [1.0] * POSITIONS, [[p] for p in range(POSITIONS)])
    with torch.no_grad():
        for index, tau in enumerate([0.3, 0.2, 0.2]):
            state = run_layer(parts.layers[index], state, index, ThresholdPolicy([0.3, 0.2, 0.2]))
            rows, _ = ref.layer_forward(ref.double_copy(parts.layers[index]), rows, tau)
            assert_same(unpack(state)[0], rows)
    assert max(rows.sizes) > 2
