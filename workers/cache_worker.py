"""``CacheWorker``: the Redis token cache as a Ray actor, so tokens go between Redis and the other actors
through Ray's object store without passing through the job's driver.

Redis failing is never an error here: every call returns a status (``"hit"``, ``"miss"``, ``"stored"`` or
``"unavailable"`` with the reason), and the caller decides to go on without the cache.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import ray

from dymu.tokens import MergedTokens
from workers.metrics import pipeline_metrics
from workers.redis_server import CacheUnavailable
from workers.token_cache import DEFAULT_TTL_S, TokenCache

logger = logging.getLogger(__name__)


# What the answer's report reads from a video's tokens (dymu.videoqa.build_report).
_STAGE_KEYS = ("encoder_tokens_per_frame", "dtome_tokens_per_frame", "layout_rows_per_frame",
               "temporal_rows_per_frame", "llm_positions", "llm_rows")


def meta_problem(meta: Any) -> str | None:
    """What is wrong with a cached value's ``meta`` for the pipeline (None: nothing). The cache is shared, so
    a value can pass the schema check and still be unusable; it must then be a miss, never an error."""
    if not isinstance(meta, dict):
        return f"is a {type(meta).__name__}, not an object"
    seconds = meta.get("seconds")
    if not isinstance(seconds, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in seconds.values()):
        return "has no \"seconds\" object of finite numbers"
    if not isinstance(meta.get("frames"), int) or not isinstance(meta.get("kind", ""), str):
        return "has no integer \"frames\" (or a \"kind\" that is not a string)"
    stages = meta.get("stages")
    if not isinstance(stages, dict) or any(name not in stages for name in _STAGE_KEYS):
        return f"has no \"stages\" object with {', '.join(_STAGE_KEYS)}"
    return None


class CacheWorker:
    def __init__(self, redis_url: str, model: str, ttl_s: int = DEFAULT_TTL_S):
        self.model = model
        self.cache = TokenCache(redis_url, ttl_s=ttl_s)

    @ray.method(num_returns=2)
    def get(self, key: str) -> tuple[dict[str, Any], MergedTokens | None]:
        """(status, tokens). On a hit, status says how long the lookup took and what the tokens first cost
        to make (decode + encode, as recorded when they were stored); the tokens' own timings are zeroed,
        since nothing was decoded or encoded for this job."""
        started = time.perf_counter()
        try:
            tokens = self.cache.get(key)
            problem = meta_problem(tokens.meta) if tokens is not None else None
            if problem is not None:  # a value that passed the schema check but that no reader could use
                logger.warning("token cache: dropping the value under %s: its meta %s", key, problem)
                self.cache.delete(key)
                tokens = None
        except CacheUnavailable as exc:
            return {"status": "unavailable", "reason": str(exc)}, None
        seconds = time.perf_counter() - started
        metrics = pipeline_metrics()
        metrics.stage(self.model, "cache_get", seconds)
        if tokens is None:
            metrics.cache_misses.inc(tags={"model": self.model})
            return {"status": "miss", "seconds": seconds}, None
        metrics.cache_hits.inc(tags={"model": self.model})
        made_in = sum(tokens.meta.get("seconds", {}).values())
        tokens.meta["seconds"] = {name: 0.0 for name in tokens.meta.get("seconds", {})} | {"cache_read": seconds}
        return {"status": "hit", "seconds": seconds, "made_in_seconds": made_in}, tokens

    def put(self, key: str, tokens: MergedTokens) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            size = self.cache.put(key, tokens)
        except CacheUnavailable as exc:
            return {"status": "unavailable", "reason": str(exc)}
        seconds = time.perf_counter() - started
        pipeline_metrics().stage(self.model, "cache_put", seconds)
        return {"status": "stored", "bytes": size, "seconds": seconds}
