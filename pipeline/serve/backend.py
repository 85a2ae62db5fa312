"""The calls the ingress makes on the encoder and LLM deployments, and the token-cache actor it starts.

A request's media becomes merged tokens once per (content hash, settings): the token cache is read first,
and only a miss reads the frames and runs the encoder. Answers stream from the LLM deployment, whose
replicas each batch the requests they are given; Serve routes each call to a replica with room for it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Awaitable, Callable

import ray
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dymu.config import VideoQAConfig
from dymu.errors import DymuError
from dymu.videoqa import Media
from pipeline.serve.media import Sampling
from pipeline.serve.protocol import ApiError
from workers.cache_worker import CacheWorker
from workers.token_cache import DEFAULT_TTL_S, token_cache_key

log = logging.getLogger(__name__)


def cause(exc: BaseException) -> BaseException:
    """The error a worker raised, out of Ray's wrapper."""
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        return exc.cause
    return exc


class Backend:
    """encoder / llm: handles to the deployments (``deployments.EncoderDeployment`` / ``LLMDeployment``).

    redis_url None: no token cache. cache_node: the Ray node id to run the cache actor on (the one that
    reaches ``redis_url``; default this process's node).
    """

    def __init__(self, config: VideoQAConfig, encoder: DeploymentHandle, llm: DeploymentHandle,
                 redis_url: str | None, cache_node: str | None = None, cache_ttl_s: int = DEFAULT_TTL_S):
        self.config = config
        self.encoder = encoder
        self.llm = llm
        self.cache = None
        if redis_url is not None:
            node = cache_node or ray.get_runtime_context().get_node_id()
            here = NodeAffinitySchedulingStrategy(node, soft=False)
            self.cache = ray.remote(CacheWorker).options(num_cpus=0, scheduling_strategy=here).remote(
                redis_url, config.model, cache_ttl_s)
        self._settings: dict[str, Any] | None = None
        self._settings_lock = asyncio.Lock()

    async def stats(self) -> dict[str, Any]:
        """One LLM replica's engine figures."""
        return await self.llm.stats.remote()

    # --- tokens --------------------------------------------------------------------------------------
    async def _encoder_settings(self, media: Any) -> dict[str, Any] | None:
        """The settings that name this server's tokens (None until the first media calibrates thresholds)."""
        async with self._settings_lock:
            if self._settings is None:
                self._settings = await self.encoder.cache_settings.remote(media)
            return self._settings

    def _key(self, source: str, settings: dict[str, Any], sampling: Sampling) -> str:
        return token_cache_key(source, self.config.model, self.config.revision or "",
                               {**settings, "sampling": dataclasses.asdict(sampling)})

    async def tokens(self, source: str, sampling: Sampling, read: Callable[[], Awaitable[Media]]
                     ) -> tuple[Any, dict[str, Any], dict[str, float]]:
        """(tokens ref, cache status, seconds) for the media named ``source``; ``read`` decodes it when needed."""
        seconds: dict[str, float] = {}
        media = None
        settings = await self._encoder_settings(None)
        if settings is None:  # the first media of a model with no thresholds yet calibrates them
            started = time.perf_counter()
            media = ray.put(await read())
            seconds["read"] = time.perf_counter() - started
            settings = await self._call(self._encoder_settings(media))
        lookup = "off"
        if self.cache is not None:
            status, tokens = self.cache.get.remote(self._key(source, settings, sampling))
            try:
                found = await status
            except ray.exceptions.RayError as exc:  # the cache actor is gone: only the cache is lost
                log.warning("token cache unavailable: %s", exc)
                found = {"status": "unavailable"}
            if found["status"] == "hit":
                return tokens, {"status": "hit"}, {"cache_read": found["seconds"]}
            lookup = found["status"]
        if media is None:
            started = time.perf_counter()
            media = ray.put(await read())
            seconds["read"] = time.perf_counter() - started
        summary, tokens = await self._call(self.encoder.encode.remote(media))
        seconds["encode"] = summary["seconds"].get("encode", 0.0) + summary["seconds"].get("layout", 0.0)
        if lookup != "miss":  # no cache, or Redis did not answer the lookup: no store either
            return tokens, {"status": lookup}, seconds
        try:  # under the settings of the replica that made them
            stored = await self.cache.put.remote(self._key(source, summary["settings"], sampling), tokens)
        except ray.exceptions.RayError as exc:
            log.warning("token cache unavailable: %s", exc)
            stored = {"status": "unavailable"}
        return tokens, {"status": "miss" if stored["status"] == "stored" else "unavailable"}, seconds

    @staticmethod
    async def _call(awaitable: Awaitable[Any]) -> Any:
        """Await an encoder call; a ``DymuError`` it raised (bad media) becomes a 400."""
        try:
            return await awaitable
        except ray.exceptions.RayTaskError as exc:
            if isinstance(cause(exc), DymuError):
                raise ApiError(400, f"cannot use the media: {cause(exc)}", "invalid_media") from None
            raise

    # --- answers -------------------------------------------------------------------------------------
    def stream(self, tokens: Any, question: str, source: str, options: dict[str, Any]) -> DeploymentResponseGenerator:
        """The LLM's text pieces, then the ``Answer``; ``cancel()`` it when the caller goes away."""
        return self.llm.options(stream=True).stream.remote(tokens, question, source, options)
