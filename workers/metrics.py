"""Pipeline metrics through ``ray.util.metrics``, so a Ray cluster's Prometheus endpoint shows them.

Ray exports them with a ``ray_`` prefix (``ray_dymu_frames_decoded`` ...), tagged with the model. Each
worker process creates its metric objects once, on first use (they need a connected Ray).
"""
from __future__ import annotations

from functools import lru_cache

from ray.util.metrics import Counter, Histogram

# Seconds: from a cache read of a few milliseconds to a long answer on a slow machine.
_SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]


class PipelineMetrics:
    def __init__(self) -> None:
        tags = ("model",)
        self.frames_decoded = Counter("dymu_frames_decoded", "video frames (or images) decoded", tags)
        self.tokens_before = Counter(
            "dymu_visual_tokens_before", "visual positions the unreduced model would feed its LLM", tags)
        self.tokens_after = Counter("dymu_visual_tokens_after", "visual rows fed to the LLM after merging", tags)
        self.cache_hits = Counter("dymu_cache_hits", "token-cache lookups that skipped decode and encode", tags)
        self.cache_misses = Counter("dymu_cache_misses", "token-cache lookups that found nothing usable", tags)
        self.stage_seconds = Histogram(
            "dymu_stage_seconds",
            "seconds one call of a stage took (hash, read, encode, cache_get, cache_put, prefill, decode)",
            _SECONDS_BUCKETS, ("model", "stage"))

    def stage(self, model: str, stage: str, seconds: float) -> None:
        self.stage_seconds.observe(seconds, tags={"model": model, "stage": stage})


@lru_cache(maxsize=1)
def pipeline_metrics() -> PipelineMetrics:
    return PipelineMetrics()
