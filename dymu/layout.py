"""Fit merged encoder tokens into the exact sequence layout the unmodified model feeds its LLM.

Between the vision encoder and the LLM a VLM moves positions around: LLaVA-OneVision pools each video
frame's 27x27 grid to 14x14 (bilinear) and appends a newline token; for images it packs AnyRes crops,
unpads them and ends each row with a newline; LLaVA-1.5 drops CLS and keeps 576 positions. Every one of
those steps acts position by position, identically on every channel, so it is a fixed linear map
``out = W @ x`` plus some learned rows (the newline) inserted at fixed places.

We read ``W`` off the model's own code instead of re-implementing it: feed an identity matrix as the
features (channel ``n`` is 1 at position ``n`` only) and a NaN "newline"; row ``m`` of the output is then
the weights of output position ``m`` over input positions, and all-NaN rows are inserted newlines.

With merged tokens, input position ``n`` carries row ``mapping[n]``, so output position ``m`` is a fixed
mix of merged rows: its *composition*. Positions with identical compositions are identical vectors, so
they share one LLM row (that is where merging saves LLM work), and VTU still gives every position its own
RoPE index. This is exact: with nothing merged it reproduces the stock features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dymu.tokens import MergedTokens

# Composition weights are rounded before comparing, so that the same mix reached by a different float
# summation order still counts as the same row.
_WEIGHT_DECIMALS = 5


@dataclass(frozen=True)
class PositionMap:
    """A sparse position-wise linear map from N input positions to M output positions.

    ``index[m, k]`` / ``weight[m, k]``: the k-th input position feeding output ``m`` and its weight
    (weight 0 pads rows with fewer inputs). ``inserted[m]`` marks outputs that are a learned token (the
    newline) rather than a mix of inputs.
    """

    index: torch.Tensor  # (M, K) int64
    weight: torch.Tensor  # (M, K) float32
    inserted: torch.Tensor  # (M,) bool
    num_inputs: int

    @property
    def num_outputs(self) -> int:
        return int(self.index.shape[0])


def probe_position_map(fn: Callable[[torch.Tensor], torch.Tensor], num_inputs: int) -> PositionMap:
    """Read the linear map of ``fn`` by running it on an identity probe.

    ``fn`` takes features (num_inputs, C) and returns (M, C); it must act the same on every channel. A
    learned row it inserts must come out as NaN (callers pass a NaN vector as the learned token).
    """
    probe = torch.eye(num_inputs, dtype=torch.float32)
    dense = fn(probe)
    inserted = torch.isnan(dense).all(dim=1)
    dense = torch.nan_to_num(dense, nan=0.0)
    k = max(int((dense != 0).sum(dim=1).max()), 1)
    weight, index = dense.abs().topk(k, dim=1)
    weight = dense.gather(1, index)
    index = torch.where(weight != 0, index, torch.zeros_like(index))
    return PositionMap(index=index, weight=weight, inserted=inserted, num_inputs=num_inputs)


def identity_map(num_inputs: int) -> PositionMap:
    """The map of a model that feeds every encoder position to the LLM as it is (LLaVA-1.5)."""
    return PositionMap(
        index=torch.arange(num_inputs).unsqueeze(1),
        weight=torch.ones(num_inputs, 1),
        inserted=torch.zeros(num_inputs, dtype=torch.bool),
        num_inputs=num_inputs,
    )


def compose(
    tokens: MergedTokens,
    position_map: PositionMap,
    project: Callable[[torch.Tensor], torch.Tensor],
    inserted_row: torch.Tensor | None = None,
) -> MergedTokens:
    """Apply ``project`` (row-wise, e.g. the multimodal projector) to the merged rows, then the position
    map, giving the LLM-side merged tokens: one row per distinct composition, a mapping over the M output
    positions, and (if the map inserts learned rows) one shared row ``inserted_row`` for all of them.
    """
    if position_map.num_inputs != tokens.num_positions:
        raise ValueError(
            f"position map expects {position_map.num_inputs} encoder positions, tokens have {tokens.num_positions}"
        )
    device = tokens.embeds.device
    index = position_map.index.to(device)
    weight = position_map.weight.to(device)
    rows = tokens.mapping[index]  # (M, K): merged row feeding each input slot
    rows = torch.where(weight != 0, rows, torch.full_like(rows, -1))
    # Canonical composition: slots sorted by row, weights of the same row summed.
    rows, order = rows.sort(dim=1)
    weight = weight.gather(1, order)
    same_as_prev = torch.zeros_like(rows, dtype=torch.bool)
    same_as_prev[:, 1:] = rows[:, 1:] == rows[:, :-1]
    group = (~same_as_prev).cumsum(dim=1) - 1
    summed = torch.zeros_like(weight).scatter_add_(1, group, weight)
    first_rows = torch.full_like(rows, -1).scatter_(1, group, rows)
    # An inserted position gets a sentinel composition of its own.
    inserted = position_map.inserted.to(device)
    first_rows[inserted] = -2
    summed[inserted] = 0.0
    key = torch.cat([first_rows.to(torch.float64), summed.to(torch.float64).round(decimals=_WEIGHT_DECIMALS)], dim=1)
    unique_keys, mapping = torch.unique(key, dim=0, return_inverse=True)

    k = rows.shape[1]
    uniq_rows = unique_keys[:, :k].long()
    uniq_weights = unique_keys[:, k:].to(torch.float32)
    projected = project(tokens.embeds)
    valid = uniq_rows >= 0
    gathered = projected[uniq_rows.clamp(min=0)]  # (U', K, D)
    mix = (uniq_weights.to(gathered.dtype) * valid).unsqueeze(-1)
    embeds = (gathered * mix).sum(dim=1)
    is_inserted = (uniq_rows[:, 0] == -2)
    if bool(is_inserted.any()):
        if inserted_row is None:
            raise ValueError("the position map inserts learned rows but no inserted_row was given")
        embeds[is_inserted] = inserted_row.to(embeds)

    frame_of_input = tokens.frame_of_position().to(device)
    num_frames = tokens.num_frames
    # An output position belongs to the frame of its first input; inserted rows go with the last frame.
    out_frame = torch.where(inserted, torch.full_like(index[:, 0], num_frames - 1), frame_of_input[index[:, 0]])
    positions_per_frame = torch.bincount(out_frame, minlength=num_frames).tolist()
    return MergedTokens(
        embeds=embeds,
        sizes=torch.bincount(mapping, minlength=unique_keys.shape[0]),
        mapping=mapping,
        positions_per_frame=positions_per_frame,
        timestamps=list(tokens.timestamps),
        config_hash=tokens.config_hash,
        meta=dict(tokens.meta),
    )


def append_learned_row(tokens: MergedTokens, row: torch.Tensor) -> MergedTokens:
    """``tokens`` followed by one more position played by a learned ``row`` (e.g. the video's newline),
    counted with the last frame."""
    embeds = torch.cat([tokens.embeds, row.to(tokens.embeds).unsqueeze(0)])
    mapping = torch.cat([tokens.mapping, torch.tensor([tokens.num_unique], device=tokens.mapping.device)])
    positions = list(tokens.positions_per_frame)
    positions[-1] += 1
    return MergedTokens(
        embeds=embeds,
        sizes=torch.cat([tokens.sizes, torch.ones(1, dtype=tokens.sizes.dtype, device=tokens.sizes.device)]),
        mapping=mapping,
        positions_per_frame=positions,
        timestamps=list(tokens.timestamps),
        config_hash=tokens.config_hash,
        meta=dict(tokens.meta),
    )
