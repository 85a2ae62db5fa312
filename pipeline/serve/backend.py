"""The actors behind the server: vision encoders, LLM workers and the token cache, and the async calls the
ingress makes on them.

A request's media becomes merged tokens once per (content hash, settings): the token cache is read first,
and only a miss reads the frames and runs the encoder. Answers go to the LLM worker with the fewest
requests in flight; each LLM worker accepts many at once (``max_concurrency``) and schedules them itself,
so an engine that batches them behind the same ``stream`` interface serves them together.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Awaitable, Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dymu.config import VideoQAConfig
from dymu.errors import DymuError
from dymu.videoqa import Media
from pipeline.jobs import plan_resources
from pipeline.serve.media import Sampling
from pipeline.serve.protocol import ApiError
from workers.cache_worker import CacheWorker
from workers.llm_worker import LLMWorker
from workers.token_cache import DEFAULT_TTL_S, token_cache_key
from workers.vision_encoder import VisionEncoder

log = logging.getLogger(__name__)


def cause(exc: BaseException) -> BaseException:
    """The error a worker raised, out of Ray's wrapper."""
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        return exc.cause
    return exc


class Backend:
    """encoders / llms: actors of each; max_concurrency: requests one LLM worker accepts at once.

    redis_url None: no token cache. cache_node: the Ray node id to run the cache actor on (the one that
    reaches ``redis_url``; default this process's node).
    """

    def __init__(self, config: VideoQAConfig, redis_url: str | None, encoders: int = 1, llms: int = 1,
                 model_worker_cpus: float | None = None, max_concurrency: int = 64, cache_node: str | None = None,
                 cache_ttl_s: int = DEFAULT_TTL_S):
        self.config = config
        _, model_res = plan_resources(ray.cluster_resources(), ray.available_resources(), 0, encoders + llms,
                                      model_worker_cpus)
        threads = max(1, int(model_res["num_cpus"]))
        self.encoders = [ray.remote(VisionEncoder).options(**model_res, max_restarts=2).remote(config, threads)
                         for _ in range(encoders)]
        self.llms = [ray.remote(LLMWorker).options(**model_res, max_restarts=2, max_concurrency=max_concurrency)
                     .remote(config, threads) for _ in range(llms)]
        self.in_flight = [0] * llms
        self.cache = None
        if redis_url is not None:
            node = cache_node or ray.get_runtime_context().get_node_id()
            here = NodeAffinitySchedulingStrategy(node, soft=False)
            self.cache = ray.remote(CacheWorker).options(num_cpus=0, scheduling_strategy=here).remote(
                redis_url, config.model, cache_ttl_s)
        self._next_encoder = 0
        self._settings: dict[str, Any] | None = None
        self._settings_lock = asyncio.Lock()

    def actors(self) -> list[Any]:
        return self.encoders + self.llms + ([self.cache] if self.cache is not None else [])

    async def ready(self) -> None:
        await asyncio.gather(*[actor.__ray_ready__.remote() for actor in self.actors()])

    def close(self) -> None:
        for actor in self.actors():
            ray.kill(actor, no_restart=True)

    async def stats(self) -> list[dict[str, int]]:
        return list(await asyncio.gather(*[llm.stats.remote() for llm in self.llms]))

    # --- tokens --------------------------------------------------------------------------------------
    async def _encoder_settings(self, media: Media | None) -> dict[str, Any] | None:
        """The settings that name this server's tokens (None until the first media calibrates thresholds)."""
        async with self._settings_lock:
            if self._settings is None:
                found = await asyncio.gather(*[e.cache_settings.remote(media) for e in self.encoders])
                if all(s is not None for s in found):
                    self._settings = found[0]
            return self._settings

    async def tokens(self, source: str, sampling: Sampling, read: Callable[[], Awaitable[Media]]
                     ) -> tuple[Any, dict[str, Any], dict[str, float]]:
        """(tokens ref, cache status, seconds) for the media named ``source``; ``read`` decodes it when needed."""
        seconds: dict[str, float] = {}
        media = None
        settings = await self._encoder_settings(None)
        if settings is None:  # the first media of a model with no thresholds yet calibrates them
            started = time.perf_counter()
            media = await read()
            seconds["read"] = time.perf_counter() - started
            settings = await self._call(self._encoder_settings(ray.put(media)))
        key = None
        if self.cache is not None:
            key = token_cache_key(source, self.config.model, self.config.revision or "",
                                  {**settings, "sampling": dataclasses.asdict(sampling)})
            status, tokens = self.cache.get.remote(key)
            try:
                found = await status
            except ray.exceptions.RayError as exc:  # the cache actor is gone: only the cache is lost
                log.warning("token cache unavailable: %s", exc)
                found, key = {"status": "unavailable"}, None
            if found["status"] == "hit":
                return tokens, {"status": "hit"}, {"cache_read": found["seconds"]}
        if media is None:
            started = time.perf_counter()
            media = await read()
            seconds["read"] = time.perf_counter() - started
        encoder = self.encoders[self._next_encoder % len(self.encoders)]
        self._next_encoder += 1
        summary, tokens = encoder.encode.remote(media)
        summary = await self._call(summary)
        seconds["encode"] = summary["seconds"].get("encode", 0.0) + summary["seconds"].get("layout", 0.0)
        status = "off" if self.cache is None else "unavailable"
        if key is not None:
            try:
                stored = await self.cache.put.remote(key, tokens)
            except ray.exceptions.RayError as exc:
                log.warning("token cache unavailable: %s", exc)
                stored = {"status": "unavailable"}
            status = "miss" if stored["status"] == "stored" else "unavailable"
        return tokens, {"status": status}, seconds

    @staticmethod
    async def _call(awaitable: Awaitable[Any]) -> Any:
        """Await a worker call; a ``DymuError`` it raised (bad media) becomes a 400."""
        try:
            return await awaitable
        except ray.exceptions.RayTaskError as exc:
            if isinstance(cause(exc), DymuError):
                raise ApiError(400, f"cannot use the media: {cause(exc)}", "invalid_media") from None
            raise

    # --- answers -------------------------------------------------------------------------------------
    def stream(self, tokens: Any, question: str, source: str, options: dict[str, Any]) -> tuple[int, Any]:
        """(worker index, the worker's stream of text pieces then the Answer); call ``done(index)`` after."""
        index = min(range(len(self.llms)), key=self.in_flight.__getitem__)
        self.in_flight[index] += 1
        return index, self.llms[index].stream.remote(tokens, question, source, options)

    def done(self, index: int) -> None:
        self.in_flight[index] -= 1
