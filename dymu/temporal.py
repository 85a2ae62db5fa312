"""Temporal merging: a row that stays the same from one frame to the next is kept once for both.

Per-frame DToMe leaves each frame with its own merged rows. Walking the frames in order, every row of frame
``f`` is matched with the rows that currently stand for frame ``f-1`` (their running means, so a row that has
absorbed ten frames is compared as the average of those ten):

* Candidates are restricted to previous rows whose source patches overlap the new row's: some patch position
  of the frame is covered by both. A static background then merges with itself, in place, while two
  similar-looking but distinct things in different parts of the image (two windows, two patches of sky) do
  not, which keeps "what is where" for the LLM. ``spatial=False`` drops the restriction (pure cosine).
* Score = cosine of embeddings; a pair merges when its score is strictly above the threshold.
* A previous row may absorb several new rows of one frame. DToMe's grouping of a static scene differs a
  little from frame to frame (noise decides the borderline merges), so a region that was one row in frame
  ``f-1`` can be two in frame ``f``; both still match it. Allowing only one absorption per row left such
  splits as new rows in every frame: on synthetic static DToMe-like frames (tests/test_temporal.py) eight
  frames kept 2.8 frames' worth of rows that way, against about one frame's worth now.
* A merge is the size-weighted mean of all the embeddings, sizes add, and the new rows' positions map to the
  earlier row, which may therefore stand for positions in many frames.

A threshold of 1.0 or more disables merging, and the result is exactly the frames' concatenation.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dymu.errors import DymuError
from dymu.tokens import InvalidTokens, MergedTokens

log = logging.getLogger(__name__)


def match_previous(
    prev_embeds: torch.Tensor,
    prev_mapping: torch.Tensor,
    new_embeds: torch.Tensor,
    new_mapping: torch.Tensor,
    spatial: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best previous row for each new row, and its cosine score.

    prev_embeds (U_p, D), prev_mapping (P_p,): the previous frame's rows and, per patch position, its row.
    new_embeds (U_f, D), new_mapping (P_f,): the same for the new frame.
    Returns ``score`` (U_f,) and ``best`` (U_f,) indices into ``prev_embeds``; ``score`` is -inf where a new
    row has no candidate.
    """
    similarity = F.normalize(new_embeds, dim=-1) @ F.normalize(prev_embeds, dim=-1).T  # (U_f, U_p)
    if spatial:
        # Positions are compared within the frame; layouts of different lengths overlap on their common prefix.
        common = min(prev_mapping.shape[0], new_mapping.shape[0])
        overlap = torch.zeros_like(similarity, dtype=torch.bool)
        overlap[new_mapping[:common], prev_mapping[:common]] = True
        similarity = similarity.masked_fill(~overlap, float("-inf"))
    score, best = similarity.max(dim=1)
    return score, best


def absorb(
    embeds: torch.Tensor, sizes: torch.Tensor, target: torch.Tensor, new_embeds: torch.Tensor, new_sizes: torch.Tensor
) -> None:
    """In place: rows ``target[i]`` of (embeds, sizes) absorb new row i (size-weighted mean, sizes add).

    Several new rows may go into one target; each target's mean is taken over all of them at once.
    """
    rows, slot = torch.unique(target, return_inverse=True)
    total = embeds[rows] * sizes[rows].to(embeds.dtype).unsqueeze(1)
    total.index_add_(0, slot, new_embeds * new_sizes.to(embeds.dtype).unsqueeze(1))
    sizes.index_add_(0, target, new_sizes)
    embeds[rows] = total / sizes[rows].to(embeds.dtype).unsqueeze(1)


def absorb_rows(tables: Sequence[torch.Tensor], sizes: torch.Tensor, target: torch.Tensor,
                new_tables: Sequence[torch.Tensor], new_sizes: torch.Tensor) -> None:
    """``absorb`` for several tables whose rows share ``sizes`` (the embeddings, then Qwen3-VL's DeepStack
    rows): each table takes the same size-weighted means; sizes add once."""
    for table, new in zip(tables[1:], new_tables[1:]):
        absorb(table, sizes.clone(), target, new, new_sizes)
    absorb(tables[0], sizes, target, new_tables[0], new_sizes)


def merge_frames(frames: Sequence[MergedTokens], threshold: float, spatial: bool = True) -> MergedTokens:
    """Merge a video's per-frame tokens across time into one ``MergedTokens`` over all frames' positions.

    ``frames[f]`` holds one frame (its mapping covers that frame's positions); in the result, frame ``f``'s
    positions come after those of frames ``< f``. DeepStack rows (Qwen3-VL) follow the same merges. See the
    module docstring for the matching rule.
    """
    _check_frames(frames)
    if threshold >= 1.0 or len(frames) == 1:
        return concatenate_frames(frames, threshold)

    first = frames[0]
    device, out_dtype = first.embeds.device, first.embeds.dtype
    work_dtype = torch.promote_types(out_dtype, torch.float32)  # running means in at least fp32
    total_rows = sum(frame.num_unique for frame in frames)
    embeds = torch.empty(total_rows, first.embeds.shape[1], dtype=work_dtype, device=device)
    deepstack = [torch.empty(total_rows, d.shape[1], dtype=work_dtype, device=device) for d in first.deepstack]
    sizes = torch.zeros(total_rows, dtype=first.sizes.dtype, device=device)
    used = 0
    mappings: list[torch.Tensor] = []
    prev_mapping = None  # (P_{f-1},) rows of the output standing for the previous frame's positions
    for frame in frames:
        new_embeds = frame.embeds.to(device=device, dtype=work_dtype)
        new_deep = [d.to(device=device, dtype=work_dtype) for d in frame.deepstack]
        new_sizes = frame.sizes.to(device)
        local_mapping = frame.mapping.to(device)
        target = torch.full((frame.num_unique,), -1, dtype=torch.long, device=device)
        if prev_mapping is not None:
            prev_rows, prev_local = torch.unique(prev_mapping, return_inverse=True)
            score, best = match_previous(embeds[prev_rows], prev_local, new_embeds, local_mapping, spatial)
            target = torch.where(score > threshold, prev_rows[best], target)

        merged = target >= 0
        absorb_rows([embeds, *deepstack], sizes, target[merged], [t[merged] for t in [new_embeds, *new_deep]],
                    new_sizes[merged])

        kept = ~merged
        num_kept = int(kept.sum())
        target = torch.where(kept, used + torch.cumsum(kept, 0) - 1, target)
        embeds[used : used + num_kept] = new_embeds[kept]
        for table, new in zip(deepstack, new_deep):
            table[used : used + num_kept] = new[kept]
        sizes[used : used + num_kept] = new_sizes[kept]
        used += num_kept
        prev_mapping = target[local_mapping]
        mappings.append(prev_mapping)

    log.debug("temporal merging at %.3f: %d rows -> %d", threshold, total_rows, used)
    tokens = _assemble(frames, embeds[:used].to(out_dtype), sizes[:used], torch.cat(mappings), threshold)
    tokens.deepstack = [d[:used].to(first.deepstack[i].dtype) for i, d in enumerate(deepstack)]
    return tokens


def concatenate_frames(frames: Sequence[MergedTokens], threshold: float = 1.0) -> MergedTokens:
    """The frames side by side, nothing merged across them (what ``merge_frames`` gives at threshold >= 1)."""
    _check_frames(frames)
    device = frames[0].embeds.device
    offsets = torch.tensor([0] + [frame.num_unique for frame in frames[:-1]], device=device).cumsum(0)
    mapping = torch.cat([frame.mapping.to(device) + offset for frame, offset in zip(frames, offsets)])
    embeds = torch.cat([frame.embeds.to(device) for frame in frames])
    sizes = torch.cat([frame.sizes.to(device) for frame in frames])
    tokens = _assemble(frames, embeds, sizes, mapping, threshold)
    tokens.deepstack = [torch.cat([frame.deepstack[i].to(device) for frame in frames])
                        for i in range(len(frames[0].deepstack))]
    return tokens


def calibrate_temporal_threshold(
    videos: Sequence[MergedTokens] | Sequence[Sequence[MergedTokens]],
    keep_fraction: float,
    spatial: bool = True,
) -> float:
    """A threshold that keeps about ``keep_fraction`` of the per-frame rows of the given videos.

    ``videos``: one video's per-frame tokens, or a list of such videos. Like DToMe's calibration, the
    scores of all frame-to-previous-frame matches are pooled and the threshold is a quantile of them: the
    score of the first match not merged. Merging compares with running means, which are steadier than any
    one frame (so a quantile of frame-to-frame scores merges too much on static stretches); the quantile is
    therefore chosen by bisection on what ``merge_frames`` actually keeps, a few merges of the data.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise DymuError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if videos and isinstance(videos[0], MergedTokens):
        videos = [videos]
    scores = [_frame_to_frame_scores(frames, spatial) for frames in videos]
    ranked = torch.cat(scores).sort(descending=True).values if scores else torch.zeros(0)
    ranked = ranked[torch.isfinite(ranked)]
    total_rows = sum(frame.num_unique for frames in videos for frame in frames)
    target_rows = keep_fraction * total_rows
    if total_rows - ranked.numel() > target_rows:
        log.warning("keep_fraction %.3f is below what temporal merging can reach; merging every match", keep_fraction)
        return -1.0
    if keep_fraction == 1.0 or ranked.numel() == 0:
        return 1.0

    def kept_at(index: int) -> int:
        return sum(merge_frames(frames, float(ranked[index]), spatial).num_unique for frames in videos)

    # ranked[i] as the threshold merges about the i best matches: kept rows fall as i grows.
    low, high = 0, ranked.numel() - 1
    kept_low, kept_high = kept_at(low), kept_at(high)
    while high - low > 1:
        middle = (low + high) // 2
        kept = kept_at(middle)
        if abs(kept - target_rows) <= 0.002 * total_rows:
            return float(ranked[middle])
        if kept > target_rows:
            low, kept_low = middle, kept
        else:
            high, kept_high = middle, kept
    best = low if abs(kept_low - target_rows) <= abs(kept_high - target_rows) else high
    return float(ranked[best])


def _frame_to_frame_scores(frames: Sequence[MergedTokens], spatial: bool) -> torch.Tensor:
    """Match scores of every frame's rows with the previous frame's own rows (not running means)."""
    _check_frames(frames)
    scores = []
    for prev, new in zip(frames[:-1], frames[1:]):
        work_dtype = torch.promote_types(new.embeds.dtype, torch.float32)
        device = new.embeds.device
        score, _ = match_previous(
            prev.embeds.to(device, work_dtype), prev.mapping.to(device), new.embeds.to(work_dtype), new.mapping, spatial
        )
        scores.append(score.cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def _check_frames(frames: Sequence[MergedTokens]) -> None:
    if not frames:
        raise InvalidTokens("temporal merging needs at least one frame")
    for index, frame in enumerate(frames):
        if frame.num_frames != 1:
            raise InvalidTokens(f"frame {index}: expected one frame's tokens, got {frame.num_frames} frames")
        if frame.embeds.shape[1] != frames[0].embeds.shape[1]:
            raise InvalidTokens(f"frame {index}: embedding width {frame.embeds.shape[1]} differs from frame 0's")
        if frame.config_hash != frames[0].config_hash:
            raise InvalidTokens(f"frame {index}: made with another config ({frame.config_hash!r})")
        if len(frame.deepstack) != len(frames[0].deepstack):
            raise InvalidTokens(f"frame {index}: {len(frame.deepstack)} DeepStack taps, frame 0 has "
                                f"{len(frames[0].deepstack)}")


def _assemble(
    frames: Sequence[MergedTokens], embeds: torch.Tensor, sizes: torch.Tensor, mapping: torch.Tensor, threshold: float
) -> MergedTokens:
    timestamps = [t for frame in frames for t in frame.timestamps]
    meta = dict(frames[0].meta)
    meta["temporal_threshold"] = float(threshold)
    meta["rows_before_temporal"] = sum(frame.num_unique for frame in frames)
    return MergedTokens(
        embeds=embeds,
        sizes=sizes,
        mapping=mapping,
        positions_per_frame=[frame.num_positions for frame in frames],
        timestamps=timestamps if len(timestamps) == len(frames) else [],
        config_hash=frames[0].config_hash,
        meta=meta,
    )
