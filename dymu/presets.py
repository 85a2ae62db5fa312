"""The presets' token shares and the merge orders: small values the typed config (``dymu.config``) checks
options against. They live here, apart from ``dymu.calibrate`` and ``dymu.merge`` (which re-export them), so
that reading and checking a config imports no torch and a bad option fails in a fraction of a second."""
from __future__ import annotations

from dymu.errors import DymuError

# DyMU-low/mid/high keep ~89/195/394 of LLaVA-1.5's 576 tokens on average; other grids keep the same share.
PRESET_SHARES = {"low": 89 / 576, "mid": 195 / 576, "high": 394 / 576}

# How the rows that survive a merge are ordered (see dymu.merge's docstring).
MERGE_ORDERS = ("positional", "authors")


def preset_keep(preset: str, num_positions: int) -> int:
    """Average tokens to keep for a preset on an encoder with ``num_positions`` tokens per image."""
    if preset not in PRESET_SHARES:
        raise DymuError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_SHARES)}")
    return round(PRESET_SHARES[preset] * num_positions)
