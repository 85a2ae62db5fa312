"""Benchmark: DToMe's two merge orders side by side on the same random SigLIP weights and images.

"positional" (ours, the default) keeps merged tokens in patch order; "authors" (DyMU's code) rebuilds each
image as [A tokens left unmerged, by descending score] + [B tokens] after every merge, so the next layer
pairs different tokens. Thresholds are calibrated once (positional, the preset's target) and applied with
both orders, one image at a time. Per image it reports the first layer that merges, the last layer after
which both orders still hold the same partition of the patches, and the final token counts.

    python bench/merge_order.py --threads 1                 # so400m shape, 27 layers, 8 images, CPU fp32
    python bench/merge_order.py --layers 12 --images 12     # shallower tower, quicker
"""
from __future__ import annotations

import argparse
import logging
import statistics

import torch

from bench.encoder import build_encoder, synthetic_images
from dymu.calibrate import calibrate, preset_keep
from dymu.merge import TokenState, initial_state
from dymu.vision import DToMeEncoder, ThresholdPolicy, encoder_parts
from dymu.vision.runner import run_layer


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--layers", type=int, default=None, help="run only the first N layers (default all 27)")
    parser.add_argument("--preset", default="mid", choices=["low", "mid", "high"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tower = build_encoder(device, torch.float32)
    if args.layers:
        del encoder_parts(tower).layers[args.layers :]
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
