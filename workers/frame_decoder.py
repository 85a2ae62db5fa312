"""``FrameDecoder``: a CPU Ray actor that turns a media file into sampled frames, and hashes files.

It needs no model weights: whether the model takes videos at all is read from the checkpoint's config.
Frames go back as a ``Media`` object that stays in Ray's object store and is handed to the encoder by
reference; the caller only fetches the small summary returned next to it.
"""
from __future__ import annotations

import time
from typing import Any

import ray

from dymu.config import VideoQAConfig
from dymu.frames import existing_file
from dymu.videoqa import Media, read_media
from workers.metrics import pipeline_metrics
from workers.token_cache import content_hash


def family_supports_video(model: str, revision: str | None = None) -> bool:
    """Whether the checkpoint's family answers about videos, from its config alone (no weights loaded)."""
    from dymu.families import FAMILIES, checkpoint_config

    return bool(FAMILIES[checkpoint_config(model, revision).model_type].supports_video)


class FrameDecoder:
    """File -> ``Media`` (sampled frames with timestamps, or one image), and file -> content hash."""

    def __init__(self, config: VideoQAConfig):
        self.config = config
        self.supports_video = family_supports_video(config.model, config.revision)

    def content_hash(self, path: str) -> str:
        """sha256 of the file's bytes: the token cache's key for this video."""
        started = time.perf_counter()
        digest = content_hash(existing_file(path))  # a FIFO would block the read: refused unopened
        pipeline_metrics().stage(self.config.model, "hash", time.perf_counter() - started)
        return digest

    @ray.method(num_returns=2)
    def read(self, path: str) -> tuple[dict[str, Any], Media]:
        """(summary, media): the summary is small enough for the caller to fetch, the frames are not."""
        media = read_media(path, self.config, self.supports_video)
        frames = 1 if media.kind == "image" else len(media.frames)
        metrics = pipeline_metrics()
        metrics.frames_decoded.inc(frames, tags={"model": self.config.model})
        metrics.stage(self.config.model, "read", media.read_seconds)
        return {"kind": media.kind, "frames": frames, "seconds": media.read_seconds}, media
