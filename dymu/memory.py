"""A live feed's visual tokens over a sliding window: bounded, however long the feed runs.

Each sampled frame arrives as its own LLM-side merged tokens (DToMe, projector and pooling: one frame's
positions, no newline). ``append_frame`` merges it into the memory the way ``dymu.temporal.merge_frames``
merges a video: every new row is matched with the rows standing for the previous frame (their running
means, restricted to overlapping source positions), and a match scoring above the threshold joins that
row; only unmatched rows are added. A static scene therefore adds almost nothing per frame.

``evict`` drops the oldest frames (older than the window, beyond a frame cap or a row budget) and the rows
only they used. A row shared with later frames stays, its size shrinks to the positions left, and its
embedding stays the running mean it was: undoing one frame's share exactly would mean keeping every
frame's contribution, and a shared row's contributions are alike by construction (cosine above the
threshold). ``assemble`` gives the window as one ``MergedTokens`` for the LLM: frames in order, then the
model's learned newline.

Qwen-VL encodes two frames per temporal slot: there a memory "frame" is one slot, its record keeps both
frames' times (``frame_times``), and the slots' DeepStack rows (Qwen3-VL) follow every merge and eviction
of the rows they go with.

Functions are pure (a ``TokenMemory`` is never changed in place), over tensors on the frames' own device.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from dymu.layout import append_learned_row
from dymu.temporal import absorb_rows, match_previous
from dymu.tokens import InvalidTokens, MergedTokens


@dataclass(frozen=True)
class FrameRecord:
    """One frame in memory: its time, its share of the positions, and what it cost when it arrived."""

    time: float
    positions: int  # LLM positions of the frame (its block of the mapping)
    rows: int  # rows it had on its own (after DToMe and the layout)
    new_rows: int  # rows it added to memory; the others joined rows already there
    meta: dict[str, Any] = field(default_factory=dict)
    frame_times: tuple[float, ...] = ()  # a temporal slot's frames (Qwen-VL); empty: one frame at ``time``

    @property
    def start(self) -> float:
        """Time of its oldest frame."""
        return self.frame_times[0] if self.frame_times else self.time

    @property
    def num_frames(self) -> int:
        return len(self.frame_times) or 1


@dataclass(frozen=True)
class TokenMemory:
    """The frames of the window and their merged rows.

    embeds: (U, D) running means, in at least float32 (cast back to ``dtype`` by ``assemble``).
    sizes: (U,) positions each row stands for, over the frames in memory.
    mapping: (N,) the row standing for each position, frame after frame.
    deepstack: Qwen3-VL's DeepStack rows, one (U, D') running mean per tap, rows as ``embeds``.
    """

    embeds: torch.Tensor
    sizes: torch.Tensor
    mapping: torch.Tensor
    frames: tuple[FrameRecord, ...]
    dtype: torch.dtype
    config_hash: str = ""
    deepstack: tuple[torch.Tensor, ...] = ()

    @property
    def num_rows(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def num_positions(self) -> int:
        return int(self.mapping.shape[0])

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def sampled_frames(self) -> int:
        """Frames sampled from the feed that the memory holds (``num_frames`` counts Qwen-VL's slots once)."""
        return sum(frame.num_frames for frame in self.frames)

    @property
    def start(self) -> float:
        return self.frames[0].start

    @property
    def end(self) -> float:
        return self.frames[-1].time

    def last_frame_mapping(self) -> torch.Tensor:
        """Rows standing for the newest frame's positions, in the frame's own position order."""
        return self.mapping[self.num_positions - self.frames[-1].positions :]


def append_frame(memory: TokenMemory | None, frame: MergedTokens, threshold: float, spatial: bool = True) -> TokenMemory:
    """``memory`` with ``frame`` (one frame's tokens, with its timestamp) merged in after its newest frame.

    ``memory`` None starts a new memory. ``threshold`` is the temporal merging threshold (>= 1.0: nothing
    merges); ``spatial`` restricts matches to overlapping positions, as ``merge_frames`` does.
    """
    if frame.num_frames != 1 or len(frame.timestamps) != 1:
        raise InvalidTokens("a live frame must be one frame's tokens with its timestamp")
    if memory is None:
        work_dtype = torch.promote_types(frame.embeds.dtype, torch.float32)  # running means in at least fp32
        return TokenMemory(frame.embeds.to(work_dtype), frame.sizes.clone(), frame.mapping.clone(),
                           (frame_record(frame, frame.num_unique),), frame.embeds.dtype, frame.config_hash,
                           tuple(d.to(work_dtype) for d in frame.deepstack))
    if len(frame.deepstack) != len(memory.deepstack):
        raise InvalidTokens(f"frame has {len(frame.deepstack)} DeepStack taps, memory {len(memory.deepstack)}")
    if frame.config_hash != memory.config_hash:
        raise InvalidTokens(f"frame made with another config ({frame.config_hash!r}, memory {memory.config_hash!r})")
    if frame.embeds.shape[1] != memory.embeds.shape[1]:
        raise InvalidTokens(f"frame rows are {frame.embeds.shape[1]} wide, memory rows {memory.embeds.shape[1]}")
    if frame.timestamps[0] < memory.end:
        raise InvalidTokens(f"frame at {frame.timestamps[0]} is older than the newest in memory ({memory.end})")

    device, work_dtype = memory.embeds.device, memory.embeds.dtype
    new_embeds = frame.embeds.to(device, work_dtype)
    new_deep = [d.to(device, work_dtype) for d in frame.deepstack]
    new_sizes = frame.sizes.to(device)
    local_mapping = frame.mapping.to(device)
    target = torch.full((frame.num_unique,), -1, dtype=torch.long, device=device)
    if threshold < 1.0:
        prev_rows, prev_local = torch.unique(memory.last_frame_mapping(), return_inverse=True)
        score, best = match_previous(memory.embeds[prev_rows], prev_local, new_embeds, local_mapping, spatial)
        target = torch.where(score > threshold, prev_rows[best], target)

    tables = [memory.embeds.clone(), *(d.clone() for d in memory.deepstack)]
    sizes = memory.sizes.clone()
    merged = target >= 0
    absorb_rows(tables, sizes, target[merged], [t[merged] for t in [new_embeds, *new_deep]], new_sizes[merged])

    kept = ~merged
    num_kept = int(kept.sum())
    target = torch.where(kept, memory.num_rows + torch.cumsum(kept, 0) - 1, target)
    embeds, *deepstack = [torch.cat([table, new[kept]]) for table, new in zip(tables, [new_embeds, *new_deep])]
    return replace(
        memory,
        embeds=embeds,
        sizes=torch.cat([sizes, new_sizes[kept]]),
        mapping=torch.cat([memory.mapping, target[local_mapping]]),
        frames=memory.frames + (frame_record(frame, num_kept),),
        deepstack=tuple(deepstack),
    )


def frame_record(frame: MergedTokens, new_rows: int) -> FrameRecord:
    """The record of one frame's (or temporal slot's) tokens; a slot's ``meta["frame_times"]`` are its frames'."""
    return FrameRecord(frame.timestamps[0], frame.num_positions, frame.num_unique, new_rows, dict(frame.meta),
                       tuple(frame.meta.get("frame_times", ())))


def rows_from_frame(memory: TokenMemory) -> torch.Tensor:
    """(F,) rows that would stay if the frames before ``f`` were dropped, for every ``f``."""
    positions = torch.tensor([frame.positions for frame in memory.frames], device=memory.mapping.device)
    frame_of_position = torch.repeat_interleave(torch.arange(memory.num_frames, device=positions.device), positions)
    last_use = torch.full((memory.num_rows,), -1, dtype=torch.long, device=positions.device)
    last_use.scatter_reduce_(0, memory.mapping, frame_of_position, reduce="amax")
    last_use_counts = torch.bincount(last_use, minlength=memory.num_frames)
    return last_use_counts.flip(0).cumsum(0).flip(0)  # rows whose last frame is f or later


def frames_to_drop(
    memory: TokenMemory, since: float | None = None, max_frames: int | None = None, max_rows: int | None = None
) -> int:
    """How many of the oldest frames to drop so that the rest are at ``since`` or later, at most
    ``max_frames`` frames and at most ``max_rows`` rows. The newest frame always stays. (A temporal slot is
    dropped whole: it starts at its first frame and counts its frames.)"""
    starts = torch.tensor([frame.start for frame in memory.frames], dtype=torch.float64)
    fits = torch.ones(memory.num_frames, dtype=torch.bool)  # fits[k]: keeping frames k.. meets every limit
    if since is not None:
        fits &= starts >= since
    if max_frames is not None:
        counts = torch.tensor([frame.num_frames for frame in memory.frames])
        fits &= counts.flip(0).cumsum(0).flip(0) <= max_frames  # frames from record k on
    if max_rows is not None:
        fits &= rows_from_frame(memory).cpu() <= max_rows
    # Every limit is monotone in k, so the first k that fits is the fewest frames to drop.
    fitting = torch.nonzero(fits)
    return min(int(fitting[0]) if len(fitting) else memory.num_frames, memory.num_frames - 1)


def drop_oldest(memory: TokenMemory, count: int) -> TokenMemory:
    """``memory`` without its ``count`` oldest frames and the rows only they used."""
    if count <= 0:
        return memory
    if count >= memory.num_frames:
        raise ValueError(f"cannot drop {count} of {memory.num_frames} frames: the newest frame always stays")
    first_position = sum(frame.positions for frame in memory.frames[:count])
    mapping = memory.mapping[first_position:]
    used = torch.zeros(memory.num_rows, dtype=torch.bool, device=mapping.device)
    used[mapping] = True
    new_index = torch.cumsum(used, 0) - 1  # rows keep their order
    mapping = new_index[mapping]
    return replace(
        memory,
        embeds=memory.embeds[used],
        sizes=torch.bincount(mapping, minlength=int(used.sum())).to(memory.sizes.dtype),
        mapping=mapping,
        frames=memory.frames[count:],
        deepstack=tuple(d[used] for d in memory.deepstack),
    )


def evict(
    memory: TokenMemory, since: float | None = None, max_frames: int | None = None, max_rows: int | None = None
) -> TokenMemory:
    """Drop the oldest frames until the window fits (see ``frames_to_drop``)."""
    return drop_oldest(memory, frames_to_drop(memory, since, max_frames, max_rows))


def assemble(memory: TokenMemory, newline: torch.Tensor | None = None, meta: dict[str, Any] | None = None) -> MergedTokens:
    """The window as the LLM takes it: every frame's positions in order, then ``newline`` (if the model has one)."""
    tokens = MergedTokens(
        embeds=memory.embeds.to(memory.dtype),
        sizes=memory.sizes.clone(),
        mapping=memory.mapping.clone(),
        positions_per_frame=[frame.positions for frame in memory.frames],
        timestamps=[frame.time for frame in memory.frames],
        config_hash=memory.config_hash,
        meta=dict(meta or {}),
        deepstack=[d.to(memory.dtype) for d in memory.deepstack],
    )
    return append_learned_row(tokens, newline) if newline is not None else tokens


def rows_added(memory: TokenMemory) -> int:
    """Rows the frames now in memory added when they arrived."""
    return sum(frame.new_rows for frame in memory.frames)
