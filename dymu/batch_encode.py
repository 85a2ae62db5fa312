"""Batched vision encoding: the frames of several videos (and images) through the encoder together.

Encoding one medium has three parts: preparing its pixels (``prepare_frames`` / ``prepare_image`` of a
visual tokenizer), the vision encoder itself, and finishing its tokens (projector, layout, temporal merging).
Only the middle one gains from a batch, and the DToMe runner already packs images with different token
counts, so here the prepared inputs of several media go through the encoder as one batch and each medium
finishes on its own. A medium's tokens equal those it gets when encoded alone, up to float rounding.

A medium that fails (unreadable pixels, a bad shape) fails alone: preparing and finishing are per medium,
and when the shared encoder call fails, its media are encoded one at a time so only the bad one fails.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dymu.tokens import MergedTokens
from dymu.visual import PendingTokens

log = logging.getLogger(__name__)


def take_batch(frame_counts: Sequence[int], max_frames: int) -> int:
    """How many of the queued media (their frame counts, oldest first) to encode now: as many as fit in
    ``max_frames`` frames, in order, and always at least one (a longer video goes alone)."""
    total, taken = 0, 0
    for count in frame_counts:
        if taken and total + count > max_frames:
            break
        total, taken = total + count, taken + 1
    return taken


def group_pending(pending: Sequence[PendingTokens | None]) -> list[list[int]]:
    """Indices of the pending media that can share one encoder call: same kind (Qwen-VL's stock path has
    one call for images and another for videos) and same input shape per frame."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pending):
        if p is not None:
            groups.setdefault((p.kind, tuple(p.pixels.shape[1:])), []).append(i)
    return list(groups.values())


def attempt(fn: Callable[[], Any]) -> Any:
    """``fn()``, or the exception it raised (a medium's failure is its result, never the batch's)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - handed back to the medium's caller
        return exc


@torch.no_grad()
def encode_pending(tokenizer: Any, pending: Sequence[PendingTokens | Exception]) -> list[MergedTokens | Exception]:
    """Encode prepared media together and finish each; a prepared medium that is an exception stays one.

    ``tokenizer``: a ``VisualTokenizer`` or ``QwenVisualTokenizer`` (anything with ``encode_pending``).
    Each medium's ``encode`` seconds are its preparing plus its share of the shared encoder call (by inputs).
    """
    results: list[Any] = list(pending)
    ready = [p if isinstance(p, PendingTokens) else None for p in pending]
    for group in group_pending(ready):
        members = [ready[i] for i in group]
        started = time.perf_counter()
        try:
            encoded = tokenizer.encode_pending(members)
        except Exception as exc:  # noqa: BLE001 - one bad medium must not fail the others: retry them alone
            if len(members) == 1:
                results[group[0]] = exc
                continue
            log.warning("a batch of %d media failed in the encoder (%s); encoding them one by one", len(members), exc)
            for i in group:
                results[i] = attempt(lambda p=ready[i]: tokenizer.encode_alone(p))
            continue
        seconds = time.perf_counter() - started
        inputs = sum(p.num_inputs for p in members)
        for i, p, out in zip(group, members, encoded):
            results[i] = attempt(lambda p=p, out=out: p.finish(out, seconds * p.num_inputs / max(inputs, 1)))
    return results
