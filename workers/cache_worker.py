"""``CacheWorker``: the Redis token cache as a Ray actor, so tokens go between Redis and the other actors
through Ray's object store without passing through the job's driver.

Redis failing is never an error here: every call returns a status (``"hit"``, ``"miss"``, ``"stored"`` or
``"unavailable"`` with the reason), and the caller decides to go on without the cache.
"""
from __future__ import annotations

import time
from typing import Any

import ray

from dymu.tokens import MergedTokens
from workers.metrics import pipeline_metrics
from workers.redis_server import CacheUnavailable
from workers.token_cache import DEFAULT_TTL_S, TokenCache


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
