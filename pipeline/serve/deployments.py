"""The vision encoder and the LLM engine as Ray Serve deployments, behind the ingress (``app.ChatServer``).

Each wraps the pipeline's own worker class (``workers.VisionEncoder``, ``workers.LLMWorker``: the same model
loading, the same batched engine with its visual-prefix cache), so the server and the Ray jobs run one code
path. Serve places the replicas (``num_replicas``, ``ray_actor_options``: see ``app.build_app``), restarts
the ones that die and routes each call to a replica with room for it.

Tokens travel by reference: ``encode`` puts them in Ray's object store and returns the reference, which the
ingress hands to the token cache and to the LLM deployment without reading them.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

import ray
from ray import serve

from dymu.config import VideoQAConfig
from dymu.tokens import MergedTokens
from dymu.videoqa import Answer, Media
from workers.llm_worker import LLMWorker
from workers.vision_encoder import VisionEncoder

ENCODER_NAME = "DymuEncoder"
LLM_NAME = "DymuLLM"


@serve.deployment(name=ENCODER_NAME, max_ongoing_requests=8)
class EncoderDeployment:
    """Media -> merged tokens. The worker queues the calls a replica is given and encodes them in batches
    (up to the config's ``encode_batch_frames``) on its model thread, so the replica keeps answering Serve's
    health checks while it encodes.
    """

    def __init__(self, config: VideoQAConfig, threads: int | None = None):
        self.encoder = VisionEncoder(config, threads)

    async def cache_settings(self, media: Media | None = None) -> dict[str, Any] | None:
        """``VisionEncoder.cache_settings``: what names this replica's tokens (None: thresholds unknown yet)."""
        return await self.encoder.cache_settings(media)

    async def encode(self, media: Media) -> tuple[dict[str, Any], Any]:
        """(summary, a reference to the ``MergedTokens``). The summary holds the replica's cache settings:
        a replica on another node may have calibrated its own thresholds, and its tokens are cached under
        those."""
        summary, tokens = await self.encoder.encode(media)
        summary["settings"] = await self.encoder.cache_settings(media)
        return summary, ray.put(tokens)

    async def stats(self) -> dict[str, Any]:
        """Batches this replica encoded and the media in each of the latest ones."""
        return await self.encoder.stats()


@serve.deployment(name=LLM_NAME, max_ongoing_requests=64)
class LLMDeployment:
    """Merged tokens + a question -> the answer, streamed; the replica's engine batches concurrent requests
    (up to the config's ``max_batch`` at a time) and reuses the visual prefix of a video asked about again.

    A caller that cancels its stream (``DeploymentResponseGenerator.cancel``, or Serve on a client
    disconnect) cancels the generator here, and the engine drops the request and frees its KV blocks.
    """

    def __init__(self, config: VideoQAConfig, threads: int | None = None):
        self.worker = LLMWorker(config, threads)

    async def stream(self, tokens: MergedTokens, question: str, source: str = "",
                     options: dict[str, Any] | None = None) -> AsyncIterator[str | Answer]:
        """The answer's text pieces as they are written, then the ``Answer`` (call through
        ``handle.options(stream=True)``)."""
        async for item in self.worker.stream(tokens, question, source, options):
            yield item

    async def stats(self) -> dict[str, Any]:
        """This replica's engine figures (running, waiting, KV blocks, prefix-cache hits, finished, cancelled)."""
        return await self.worker.stats()
