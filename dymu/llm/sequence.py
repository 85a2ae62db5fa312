"""The LLM's input with merged visual tokens: unique rows plus the row of every original position.

A prompt such as ``<text> <video block> <text>`` becomes a ``VirtualSequence``: ``rows`` holds the input
embeddings of the text tokens and of the unique (merged) visual tokens, ``mapping[n]`` says which row plays
virtual position ``n`` (positions are numbered exactly as the unmerged model would number them), and
``visual[n]`` marks the positions that pruning may drop. Text positions always have a row of their own.

Models with M-RoPE (Qwen2.5-VL, Qwen3-VL) number positions in three axes (t, h, w): ``positions`` then holds
each position's (3, N) index as the stock model computes it; None means position n is n. Qwen3-VL's
DeepStack adds, after each of its first decoder layers, one feature row per visual row (``deepstack``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn

from dymu.errors import DymuError
from dymu.llm.decoder import Decoder, load_decoder
from dymu.tokens import MergedTokens

Segment = Union[Sequence[int], torch.Tensor, MergedTokens]


@dataclass
class VirtualSequence:
    """rows (U, D) input embeddings; mapping (N,) int64 position -> row; visual (N,) bool.

    positions: None (position n is n, 1-D RoPE) or (3, N) int64 M-RoPE (t, h, w) indices.
    deepstack: None or one (U_visual, D) tensor per early decoder layer, added after that layer to the hidden
        states of the visual rows (the rows that visual positions play, in row order).
    """

    rows: torch.Tensor
    mapping: torch.Tensor
    visual: torch.Tensor
    positions: torch.Tensor | None = None
    deepstack: list[torch.Tensor] | None = None

    def position_ids(self) -> torch.Tensor:
        """(N,) arange when ``positions`` is None, else the (3, N) M-RoPE indices."""
        if self.positions is None:
            return torch.arange(self.num_positions, device=self.mapping.device)
        return self.positions

    @property
    def next_position(self) -> int:
        """The RoPE position of the first generated token: N for 1-D, ``positions.max() + 1`` for M-RoPE."""
        if self.positions is None:
            return self.num_positions
        return int(self.positions.max()) + 1

    def visual_rows(self) -> torch.Tensor:
        """(U_visual,) ascending ids of the rows that visual positions play (DeepStack's row order)."""
        return torch.unique(self.mapping[self.visual])

    @property
    def num_positions(self) -> int:
        return int(self.mapping.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])

    @property
    def num_visual(self) -> int:
        return int(self.visual.sum())

    def is_identity(self) -> bool:
        """True when nothing is merged: position n is row n."""
        return self.num_rows == self.num_positions and bool(
            (self.mapping == torch.arange(self.num_positions, device=self.mapping.device)).all()
        )

    def validate(self, max_positions: int | None = None) -> "VirtualSequence":
        """Check the contract; raise ``DymuError`` with the reason if it is broken."""
        if self.rows.dim() != 2 or not self.rows.is_floating_point():
            raise DymuError(f"rows must be a 2-D float tensor (U, D), got {self.rows.dtype} {tuple(self.rows.shape)}")
        if self.mapping.dim() != 1 or self.mapping.dtype != torch.long:
            raise DymuError(f"mapping must be a 1-D int64 tensor, got {self.mapping.dtype} {tuple(self.mapping.shape)}")
        if self.visual.shape != self.mapping.shape or self.visual.dtype != torch.bool:
            raise DymuError(f"visual must be a bool tensor shaped like mapping {tuple(self.mapping.shape)}")
        n, u = self.num_positions, self.num_rows
        if n == 0:
            raise DymuError("the sequence is empty")
        if max_positions is not None and n > max_positions:
            raise DymuError(
                f"the prompt has {n} positions (visual block unmerged), more than the model's context "
                f"of {max_positions} positions"
            )
        if int(self.mapping.min()) < 0 or int(self.mapping.max()) >= u:
            low, high = int(self.mapping.min()), int(self.mapping.max())
            raise DymuError(f"mapping points outside the {u} rows (range {low}..{high})")
        uses = torch.bincount(self.mapping, minlength=u)
        if bool((uses == 0).any()):
            unused = int((uses == 0).sum())
            raise DymuError(f"{unused} of {u} rows are not used by any position (mapping does not cover the rows)")
        if bool((uses[self.mapping[~self.visual]] != 1).any()):
            raise DymuError("a text position shares its row with another position; text rows must map 1:1")
        if self.positions is not None and (
            self.positions.shape != (3, n) or self.positions.dtype != torch.long
        ):
            raise DymuError(f"positions must be (3, {n}) int64 M-RoPE indices, got {self.positions.dtype} "
                            f"{tuple(self.positions.shape)}")
        if self.deepstack is not None:
            expected = (int(self.visual_rows().shape[0]), int(self.rows.shape[1]))
            for i, features in enumerate(self.deepstack):
                if tuple(features.shape) != expected:
                    raise DymuError(f"deepstack[{i}] has shape {tuple(features.shape)}, expected {expected} "
                                    f"(one row per visual row)")
        return self

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "VirtualSequence":
        """Rows in ``dtype`` on ``device``, mapping and flags on ``device``."""
        return VirtualSequence(
            self.rows.to(device, dtype), self.mapping.to(device), self.visual.to(device),
            None if self.positions is None else self.positions.to(device),
            None if self.deepstack is None else [d.to(device, dtype) for d in self.deepstack],
        )

    def unmerged(self) -> "VirtualSequence":
        """Every position with its own copy of its row: what the stock model would be given."""
        return self._reordered(self.mapping, torch.arange(self.num_positions, device=self.mapping.device),
                               self.positions)

    def consecutive(self) -> "VirtualSequence":
        """The "no VTU" baseline: each row once, in order of first appearance, at consecutive positions.

        With M-RoPE each row keeps the (t, h, w) index of its first position instead (as vLLM's EVS keeps
        the positions of the video tokens it keeps): renumbering a video 0..U-1 would throw its grid away.
        """
        first = torch.full((self.num_rows,), self.num_positions, dtype=torch.long, device=self.mapping.device)
        first.scatter_reduce_(0, self.mapping, torch.arange(self.num_positions, device=self.mapping.device), "amin")
        order = torch.argsort(first)
        positions = None if self.positions is None else self.positions[:, first[order]]
        return self._reordered(order, first[order], positions)

    def _reordered(self, old_rows: torch.Tensor, old_positions: torch.Tensor,
                   positions: torch.Tensor | None) -> "VirtualSequence":
        """A sequence whose position j is old position ``old_positions[j]``, played by its own new row j,
        a copy of old row ``old_rows[j]``; DeepStack rows follow their rows."""
        visual = self.visual[old_positions]
        deepstack = None
        if self.deepstack is not None:
            rank = torch.searchsorted(self.visual_rows(), old_rows[visual])
            deepstack = [d.index_select(0, rank) for d in self.deepstack]
        return VirtualSequence(self.rows.index_select(0, old_rows),
                               torch.arange(old_rows.shape[0], device=self.mapping.device),
                               visual, positions, deepstack)


def build_sequence(model: nn.Module | Decoder, segments: Sequence[Segment]) -> VirtualSequence:
    """Concatenate prompt segments, in order, into a ``VirtualSequence`` on the model's device and dtype.

    A segment is one of: token ids (a list of ints or a 1-D integer tensor), embedded with the model's
    ``embed_tokens`` (text); a ``MergedTokens`` (a visual block: its unique rows and its mapping); or a 2-D
    float tensor of input embeddings, one row per position (unmerged visual rows, e.g. image-newline tokens).
    """
    decoder = load_decoder(model)
    rows, mapping, visual = [], [], []
    num_rows = 0
    for segment in segments:
        if isinstance(segment, MergedTokens):
            segment.validate()
            block_rows, block_map = segment.embeds, segment.mapping.to(decoder.device)
            is_visual = True
        elif isinstance(segment, torch.Tensor) and segment.is_floating_point():
            if segment.dim() != 2:
                raise DymuError(f"an embedding segment must be 2-D (n, D), got shape {tuple(segment.shape)}")
            block_rows, block_map = segment, torch.arange(segment.shape[0], device=decoder.device)
            is_visual = True
        else:
            ids = torch.as_tensor(segment, dtype=torch.long, device=decoder.device).reshape(-1)
            with torch.no_grad():
                block_rows = decoder.embed_tokens(ids)
            block_map = torch.arange(ids.shape[0], device=decoder.device)
            is_visual = False
        rows.append(block_rows.to(decoder.device, decoder.dtype))
        mapping.append(block_map + num_rows)
        visual.append(torch.full(block_map.shape, is_visual, dtype=torch.bool, device=decoder.device))
        num_rows += block_rows.shape[0]
    if not rows:
        raise DymuError("the prompt has no segments")
    sequence = VirtualSequence(torch.cat(rows), torch.cat(mapping), torch.cat(visual))
    return sequence.validate(decoder.max_positions)
