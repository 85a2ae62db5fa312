"""Benchmark: DToMe's two merge orders side by side on the same random SigLIP weights and images.

"positional" (ours, the default) keeps merged tokens in patch order; "authors" (DyMU's code) rebuilds each
image as [A tokens left unmerged, by descending score] + [B tokens] after every merge, so the next layer
pairs different tokens. Thresholds are calibrated once (positional, the preset's target) and applied with
both orders, one image at a time. Per image it reports the first layer that merges, the last layer after
which both orders still hold the same partition of the patches, and the final token counts.

``--reference`` instead checks how closely the "authors" order follows the authors' algorithm: each image
runs through our fast encoder (float32) and through the slow literal reference of their algorithm in
tests/dtome_reference.py, in float64 and in float32, with the same thresholds (calibrated once in the
authors' order). Per image it reports the first layer whose rows differ from the float64 reference (order,
then partition), the smallest gap there between two edge scores or a score and tau (a near tie that
rounding can rank either way), and the final token counts. The reference is Python loops (1-3 s a layer
per image and dtype): 6 images take ~20 min of CPU. Only gradient and natural-ish images are used, the
kinds that merge partway (flat ones collapse in the first layer, the busy texture keeps everything).

    python -m bench.merge_order --threads 1                 # so400m shape, 27 layers, 8 images, CPU fp32
    python -m bench.merge_order --layers 12 --images 12     # shallower tower, quicker
    python -m bench.merge_order --reference --threads 1 --images 6    # authors order against the reference
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
from dataclasses import dataclass

import torch

from bench.encoder import build_encoder, synthetic_images
from dymu.calibrate import calibrate, preset_keep
from dymu.merge import TokenState, initial_state
from dymu.vision import DToMeEncoder, ThresholdPolicy, encoder_parts
from dymu.vision.runner import run_layer
from tests import dtome_reference as ref


def canonical(state: TokenState) -> torch.Tensor:
    """The partition of one image's positions, as the first position of each position's group."""
    mapping = state.mapping[0]
    first = torch.full((state.lengths[0],), mapping.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, mapping, torch.arange(mapping.shape[0]), "amin")
    return first[mapping]


@torch.no_grad()
def partitions(tower, pixels: torch.Tensor, taus: list[float], order: str) -> list[tuple[int, torch.Tensor]]:
    """(tokens, partition) after every layer, for one image."""
    parts = encoder_parts(tower)
    state = initial_state(parts.embed(pixels[None]))
    out = []
    for index, layer in enumerate(parts.layers[: len(taus)]):
        state = run_layer(layer, state, index, ThresholdPolicy(taus), parts.num_protected, order)
        out.append((state.lengths[0], canonical(state)))
    return out


def row_groups(state: TokenState) -> list[list[int]]:
    """One image's rows in the order the state holds them, each as the sorted positions it stands for."""
    mapping = state.mapping[0]
    by_row = mapping.argsort(stable=True)
    return [g.tolist() for g in by_row.split(torch.bincount(mapping, minlength=state.lengths[0]).tolist())]


@dataclass
class LayerRows:
    """After one layer: the rows (groups of positions, in row order) and the edge scores it considered."""

    groups: list[list[int]]
    scores: list[float]


@torch.no_grad()
def fast_layers(tower, pixels: torch.Tensor, taus: list[float], order: str) -> list[list[list[int]]]:
    """Our encoder on one image: its rows after every layer."""
    parts = encoder_parts(tower)
    state = initial_state(parts.embed(pixels[None]))
    out = []
    for index, layer in enumerate(parts.layers[: len(taus)]):
        state = run_layer(layer, state, index, ThresholdPolicy(taus), parts.num_protected, order)
        out.append(row_groups(state))
    return out


@torch.no_grad()
def reference_layers(tower, images: torch.Tensor, taus: list[float], dtype: torch.dtype) -> list[list[LayerRows]]:
    """The literal reference of the authors' algorithm, per image, in ``dtype``: rows after every layer.

    Layer by layer over all images, so that only one layer at a time is copied to ``dtype``.
    """
    parts = encoder_parts(tower)
    rows = []
    for embedded in parts.embed(images).to(dtype):
        rows.append(ref.Rows(list(embedded), [1.0] * len(embedded), [[p] for p in range(len(embedded))]))
    out: list[list[LayerRows]] = [[] for _ in rows]
    for layer, tau in zip(parts.layers, taus):
        layer = copy.deepcopy(layer).to(dtype)
        for i, image in enumerate(rows):
            rows[i], found = ref.layer_forward(layer, image, tau, parts.num_protected, "authors")
            out[i].append(LayerRows(rows[i].groups, [score for score, _ in found.values()]))
    return out


def first_difference(ours: list[list[list[int]]], theirs: list[LayerRows]) -> tuple[int | None, int | None]:
    """The first layer whose rows differ (in order or membership), and the first whose partition differs."""
    order = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b.groups), None)
    partition = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if ref.partition(a) != ref.partition(b.groups)),
                     None)
    return order, partition


def closest_call(scores: list[float], tau: float) -> float:
    """The smallest gap between two edge scores, or between a score and tau: what rounding can flip."""
    ordered = sorted(scores)
    gaps = [b - a for a, b in zip(ordered, ordered[1:])] + [abs(s - tau) for s in ordered]
    return min(gaps) if gaps else float("inf")


def merging_images(count: int, seed: int) -> torch.Tensor:
    """``count`` synthetic images alternating gradient and natural-ish (the kinds that merge partway)."""
    pixels = synthetic_images(2 * count + 2, seed=seed)
    return pixels[[i for i in range(len(pixels)) if i % 4 in (1, 3)][:count]]


def layer_text(layer: int | None) -> str:
    return "-" if layer is None else str(layer)


def reference_main(args: argparse.Namespace, tower) -> None:
    """Our "authors" order (fast, float32) and the reference in float32 against the reference in float64."""
    encoder = DToMeEncoder(tower, merge_order="authors")
    keep = preset_keep(args.preset, encoder.num_positions)
    taus = calibrate(encoder, synthetic_images(8, seed=1).split(4), keep)
    pixels = merging_images(args.images, seed=args.seed)
    float64 = reference_layers(tower, pixels, taus, torch.float64)
    float32 = reference_layers(tower, pixels, taus, torch.float32)

    print(f"{len(taus)} layers, {encoder.num_positions} tokens, preset {args.preset} (target {keep}), "
          f"{args.images} images (gradient / natural-ish, seed {args.seed}); thresholds calibrated in the authors' "
          f"order. Against the reference in float64: first layer whose rows differ (order / partition), the "
          f"closest call there, tokens after the last layer.")
    print("| image | first merge | tokens, reference f64 | ours: rows differ from layer | closest call | "
          "ours: tokens | reference f32: rows differ from layer | closest call | reference f32: tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    gaps: dict[str, list[int]] = {"ours": [], "f32": []}
    same = {"ours": 0, "f32": 0}
    merging = 0
    for i in range(len(pixels)):
        exact = float64[i]
        n_exact = len(exact[-1].groups)
        first_merge = next((layer for layer, rows in enumerate(exact) if len(rows.groups) < encoder.num_positions),
                           None)
        merging += first_merge is not None
        cells = []
        for name, groups in (("ours", fast_layers(tower, pixels[i], taus, "authors")),
                             ("f32", [rows.groups for rows in float32[i]])):
            order, partition = first_difference(groups, exact)
            same[name] += order is None
            call = "-" if order is None else f"{closest_call(exact[order].scores, taus[order]):.1e}"
            gaps[name].append(len(groups[-1]) - n_exact)
            tokens = f"{len(groups[-1])} ({gaps[name][-1]:+d})"
            cells += [f"{layer_text(order)} / {layer_text(partition)}", call, tokens]
        print(f"| {i} | {layer_text(first_merge)} | {n_exact} | " + " | ".join(cells) + " |")
    for name, label in (("ours", "ours (authors order, float32)"), ("f32", "reference in float32")):
        spread = [abs(g) for g in gaps[name]]
        print(f"{label}: identical to the float64 reference on every layer in {same[name]} of {len(pixels)} images "
              f"({merging} merge); final |token difference| max {max(spread)}, mean {statistics.mean(spread):.1f} "
              f"of {encoder.num_positions}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--layers", type=int, default=None, help="run only the first N layers (default all 27)")
    parser.add_argument("--preset", default="mid", choices=["low", "mid", "high"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference", action="store_true",
                        help="check the authors order against the literal reference of their algorithm (float64 "
                             "and float32) instead of comparing the two orders; CPU only")
    parser.add_argument("--seed", type=int, default=2, help="seed of the --reference images (default 2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tower = build_encoder(device, torch.float32)
    if args.layers:
        del encoder_parts(tower).layers[args.layers :]
    if args.reference:
        reference_main(args, tower)
        return
    pixels = synthetic_images(args.images, seed=1).to(device)
    encoder = DToMeEncoder(tower)
    keep = preset_keep(args.preset, encoder.num_positions)
    taus = calibrate(encoder, pixels.split(4), keep)

    print(f"{len(taus)} layers, {encoder.num_positions} tokens, preset {args.preset} (target {keep}), "
          f"{args.images} images; thresholds calibrated with the positional order")
    print(f"{'image':>5}  {'first merge':>11}  {'same through':>12}  {'positional':>10}  {'authors':>7}  {'diff':>5}")
    diffs, counts = [], {"positional": [], "authors": []}
    for i in range(args.images):
        ours = partitions(tower, pixels[i], taus, "positional")
        theirs = partitions(tower, pixels[i], taus, "authors")
        first_merge = next((layer for layer, (n, _) in enumerate(ours) if n < encoder.num_positions), None)
        same = [torch.equal(a, b) for (_, a), (_, b) in zip(ours, theirs)]
        same_through = (same + [False]).index(False) - 1
        n_ours, n_theirs = ours[-1][0], theirs[-1][0]
        counts["positional"].append(n_ours)
        counts["authors"].append(n_theirs)
        diffs.append(n_theirs - n_ours)
        print(f"{i:>5}  {str(first_merge):>11}  {same_through:>12}  {n_ours:>10}  {n_theirs:>7}  "
              f"{n_theirs - n_ours:>+5}")
    print(f"mean tokens: positional {statistics.mean(counts['positional']):.1f}, "
          f"authors {statistics.mean(counts['authors']):.1f}; count difference mean "
          f"{statistics.mean(diffs):+.1f}, largest {max(diffs, key=abs):+d}")


if __name__ == "__main__":
    main()
