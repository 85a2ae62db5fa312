"""The value that carries a video's visual tokens from encoder to cache to LLM.

A ``MergedTokens`` holds the unique (merged) rows and, for every original position (a patch of a frame,
or a pooled cell), the row that stands for it. That mapping is a partition of the original positions,
so it is all the LLM side needs for virtual unmerging: row ``mapping[n]`` plays position ``n``.

It serialises with safetensors (tensors plus a string header), never pickle: the cache is shared
between processes and machines, and unpickling is code execution.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dymu.errors import DymuError

SCHEMA_VERSION = 1


class InvalidTokens(DymuError):
    """Raised when a ``MergedTokens`` (or its serialised bytes) breaks the contract."""


@dataclass
class MergedTokens:
    """Merged visual tokens for one image or video.

    embeds:  (U, D) unique merged rows.
    sizes:   (U,) how many original positions each row stands for.
    mapping: (N,) int64, ``mapping[n]`` is the row standing for original position ``n``.
    positions_per_frame: how many original positions each frame has (sums to N); frame ``f`` owns the
        contiguous block of positions after the first ``f`` frames.
    timestamps: seconds of each frame in its video (empty for a still image).
    config_hash: hash of everything that changed how these tokens were made.
    meta: small JSON-able extras (model id, preset, per-stage token counts...).
    deepstack: Qwen3-VL's DeepStack features, one (U, D) tensor per tap, rows as ``embeds`` (empty otherwise).
    """

    embeds: torch.Tensor
    sizes: torch.Tensor
    mapping: torch.Tensor
    positions_per_frame: list[int]
    timestamps: list[float] = field(default_factory=list)
    config_hash: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    deepstack: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_unique(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def num_positions(self) -> int:
        return int(self.mapping.shape[0])

    @property
    def num_frames(self) -> int:
        return len(self.positions_per_frame)

    def frame_of_position(self) -> torch.Tensor:
        """(N,) frame index of every original position."""
        counts = torch.tensor(self.positions_per_frame, dtype=torch.long)
        return torch.repeat_interleave(torch.arange(len(counts)), counts)

    def rows_per_frame(self) -> list[int]:
        """Unique rows that first appear in each frame (a row shared by frames counts once, at its first)."""
        first_frame = torch.full((self.num_unique,), self.num_frames, dtype=torch.long)
        first_frame.scatter_reduce_(0, self.mapping.cpu(), self.frame_of_position(), reduce="amin")
        return torch.bincount(first_frame, minlength=self.num_frames)[: self.num_frames].tolist()

    def validate(self) -> "MergedTokens":
        """Check the contract; raise ``InvalidTokens`` with the reason if it is broken."""
        if self.embeds.dim() != 2:
            raise InvalidTokens(f"embeds must be 2-D (U, D), got shape {tuple(self.embeds.shape)}")
        u = self.num_unique
        if self.sizes.shape != (u,):
            raise InvalidTokens(f"sizes must have shape ({u},), got {tuple(self.sizes.shape)}")
        if self.mapping.dim() != 1 or self.mapping.dtype != torch.long:
            raise InvalidTokens("mapping must be a 1-D int64 tensor")
        if sum(self.positions_per_frame) != self.num_positions:
            raise InvalidTokens(
                f"positions_per_frame sums to {sum(self.positions_per_frame)}, mapping has {self.num_positions}"
            )
        if self.num_positions and (int(self.mapping.min()) < 0 or int(self.mapping.max()) >= u):
            raise InvalidTokens("mapping points outside the unique rows")
        counts = torch.bincount(self.mapping.cpu(), minlength=u)
        if bool((counts == 0).any()):
            raise InvalidTokens("some unique rows stand for no position (mapping is not onto)")
        if not torch.equal(counts.to(self.sizes.dtype), self.sizes.cpu()):
            raise InvalidTokens("sizes disagree with the mapping")
        if self.timestamps and len(self.timestamps) != self.num_frames:
            raise InvalidTokens("one timestamp per frame is required")
        for i, features in enumerate(self.deepstack):
            if features.dim() != 2 or features.shape[0] != u:
                raise InvalidTokens(f"deepstack[{i}] must have shape ({u}, D), got {tuple(features.shape)}")
        return self

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "MergedTokens":
        return MergedTokens(
            embeds=self.embeds.to(device=device, dtype=dtype),
            sizes=self.sizes.to(device=device),
            mapping=self.mapping.to(device=device),
            positions_per_frame=list(self.positions_per_frame),
            timestamps=list(self.timestamps),
            config_hash=self.config_hash,
            meta=dict(self.meta),
            deepstack=[d.to(device=device, dtype=dtype) for d in self.deepstack],
        )

    def to_bytes(self) -> bytes:
        header = {
            "schema": str(SCHEMA_VERSION),
            "positions_per_frame": json.dumps(self.positions_per_frame),
            "timestamps": json.dumps(self.timestamps),
            "config_hash": self.config_hash,
            "meta": json.dumps(self.meta),
        }
        tensors = {
            "embeds": self.embeds.detach().contiguous().cpu(),
            "sizes": self.sizes.detach().contiguous().cpu(),
            "mapping": self.mapping.detach().contiguous().cpu(),
        }
        tensors.update({f"deepstack.{i}": d.detach().contiguous().cpu() for i, d in enumerate(self.deepstack)})
        return st_save(tensors, metadata=header)

    @classmethod
    def from_bytes(cls, data: bytes) -> "MergedTokens":
        """Parse and validate; anything foreign, truncated or of another schema raises ``InvalidTokens``."""
        try:
            tensors = st_load(data)
            header = _read_safetensors_header(data)
            if header.get("schema") != str(SCHEMA_VERSION):
                raise InvalidTokens(f"schema {header.get('schema')!r}, expected {SCHEMA_VERSION}")
            tokens = cls(
                embeds=tensors["embeds"],
                sizes=tensors["sizes"],
                mapping=tensors["mapping"],
                positions_per_frame=[int(x) for x in json.loads(header["positions_per_frame"])],
                timestamps=[float(x) for x in json.loads(header["timestamps"])],
                config_hash=header["config_hash"],
                meta=json.loads(header["meta"]),
                deepstack=[tensors[f"deepstack.{i}"] for i in range(sum(k.startswith("deepstack.") for k in tensors))],
            )
        except InvalidTokens:
            raise
        except Exception as exc:  # safetensors raises several types for malformed bytes
            raise InvalidTokens(f"not a merged-tokens value: {exc}") from exc
        return tokens.validate()


def _read_safetensors_header(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}
