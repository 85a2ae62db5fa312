"""The engine of live feeds: the encoder and the LLM that every feed shares.

``LocalEngine`` runs the model in this process; ``RayEngine`` runs it as Ray actors (a ``FrameEncoder``,
which is the pipeline's ``VisionEncoder`` plus per-frame encoding, and the pipeline's ``LLMWorker``), on a
cluster's GPU when it has one. A feed's frames are encoded each on its own (DToMe, projector and pooling),
because temporal merging happens against the feed's running memory, not inside one video. Qwen-VL's
encoder takes two frames per temporal slot: there each pair of frames is encoded as one slot, the unit of
the feed's memory.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from dymu.errors import DymuError
from dymu.families import QwenVLFamily
from dymu.layout import compose
from dymu.tokens import MergedTokens
from dymu.config import VideoQAConfig
from dymu.videoqa import Answer, Media, VideoQA
from dymu.visual_qwen import QwenVisualTokenizer, feed_slots
from workers.llm_worker import LLMWorker
from workers.vision_encoder import VisionEncoder


class Engine(Protocol):
    config: VideoQAConfig
    frames_per_slot: int  # frames the encoder takes as one unit: 1, or Qwen-VL's 2

    def encode_frames(self, images: Sequence[np.ndarray], times: Sequence[float]) -> list[MergedTokens]:
        """Each frame (H, W, 3) uint8 -> its own LLM-side merged tokens (DToMe, projector, pooling); Qwen-VL:
        each consecutive pair of frames -> one temporal slot's tokens (see ``dymu.visual_qwen.feed_slots``)."""

    def answer(self, tokens: MergedTokens, question: str, source: str = "") -> Answer: ...

    def newline(self) -> torch.Tensor | None:
        """The learned row that ends a video in the LLM's input, if the model has one."""

    def cache_settings(self) -> dict[str, Any]:
        """Everything besides the model that decides the tokens (names them in the token cache)."""

    def close(self) -> None: ...


def frames_per_slot(qa: VideoQA) -> int:
    """Frames the model's encoder takes as one unit: Qwen-VL's temporal patch (2), else 1."""
    return qa.family.processor.video_processor.temporal_patch_size if isinstance(qa.family, QwenVLFamily) else 1


def cpu_threads_beside(feeds: int) -> int:
    """Torch threads for a CPU engine that leave a core to each feed's reader process. OpenMP threads that
    share a core with a busy process spin and wait: on 2 cores beside one reader, 2 threads encoded frames
    6x slower than 1 (145 against 24 ms a frame, tiny model) and dropped three frames in four at 10 frames/s."""
    return max(1, (os.cpu_count() or 1) - feeds)


class LocalEngine:
    """The model in this process. One lock per stage: feeds take turns, and encoding can overlap an answer."""

    def __init__(self, qa: VideoQA):
        if not qa.family.supports_video:
            raise DymuError(f"{qa.config.model} ({qa.family.name}) answers about images only, not about feeds")
        self.qa = qa
        self.config = qa.config
        self.frames_per_slot = frames_per_slot(qa)
        self._encode_lock = threading.Lock()
        self._answer_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: VideoQAConfig, feeds: int | None = None) -> "LocalEngine":
        """Load the model; on a CPU, with ``feeds`` given, torch keeps one core free for each feed's reader."""
        from dymu.families import load_family

        engine = cls(VideoQA(load_family(config.model, config.device, config.dtype, config.revision), config))
        if feeds and next(engine.qa.family.model.parameters()).device.type == "cpu":
            torch.set_num_threads(cpu_threads_beside(feeds))
        return engine

    @torch.no_grad()
    def encode_frames(self, images: Sequence[np.ndarray], times: Sequence[float]) -> list[MergedTokens]:
        family = self.qa.family
        with self._encode_lock:
            # Thresholds the model has none of yet are calibrated on the first frames, as for a first video.
            first = np.stack([image for image in images if image.shape == images[0].shape])
            visual = self.qa.visual_tokenizer(Media("live feed", "video", frames=first, timestamps=list(times)))
            config_hash = self.config.encoder_fingerprint()
            if isinstance(visual, QwenVisualTokenizer):
                return feed_slots(visual, images, times, config_hash)
            # One resize per frame: a feed's size can change when it reconnects.
            pixels = torch.cat([family.frame_pixels(image[None]) for image in images])
            merged = visual.encode_pixels(pixels)
            meta = {"encoder_tokens": visual.encoder.num_positions}
            return [compose(image.to_tokens(float(t), config_hash, meta | {"dtome_tokens": image.num_tokens}),
                            family.frame_map(), family.project) for image, t in zip(merged, times)]

    def answer(self, tokens: MergedTokens, question: str, source: str = "") -> Answer:
        with self._answer_lock:
            return self.qa.answer(tokens, question, source=source)

    def newline(self) -> torch.Tensor | None:
        row = self.qa.family.newline
        return None if row is None else row.detach()

    def cache_settings(self) -> dict[str, Any]:
        visual = self.qa.visual_tokenizer()
        dtype = next(self.qa.family.model.parameters()).dtype
        return {"encoder": self.config.encoder_fingerprint(), "taus": visual.taus, "dtype": str(dtype)}

    def close(self) -> None:
        pass


class FrameEncoder(VisionEncoder):
    """The pipeline's ``VisionEncoder`` actor plus what a feed needs: each frame encoded on its own, since
    temporal merging happens in the feed's memory, and the model's newline row. Its model work runs on the
    encoder's model thread, in turn with any batch of ``encode`` calls."""

    async def encode_each(self, images: Sequence[np.ndarray], times: Sequence[float]) -> list[MergedTokens]:
        def run() -> list[MergedTokens]:
            return [tokens.to("cpu") for tokens in LocalEngine(self.qa).encode_frames(images, times)]

        return await self._on_model_thread(run)

    def newline(self) -> torch.Tensor | None:
        row = self.qa.family.newline
        return None if row is None else row.detach().cpu()

    async def frames_per_slot(self) -> int:
        return frames_per_slot(self.qa)

    async def engine_cache_settings(self) -> dict[str, Any]:
        return await self._on_model_thread(LocalEngine(self.qa).cache_settings)


class RayEngine:
    """The encoder and the LLM as Ray actors (a ``FrameEncoder`` and the pipeline's ``LLMWorker``), shared by
    every feed of this process; on a GPU wherever the cluster has one. Call ``close`` to end them."""

    def __init__(self, config: VideoQAConfig, model_worker_cpus: float | None = None):
        import ray

        from pipeline.jobs import plan_resources

        self.config = config
        _, resources = plan_resources(ray.cluster_resources(), ray.available_resources(), 0, 2, model_worker_cpus)
        threads = max(1, int(resources["num_cpus"]))
        self.encoder = ray.remote(FrameEncoder).options(**resources).remote(config, threads)
        self.llm = ray.remote(LLMWorker).options(**resources).remote(config, threads)
        self._newline = ray.get(self.encoder.newline.remote())  # also waits until the model has loaded
        self.frames_per_slot = ray.get(self.encoder.frames_per_slot.remote())

    def encode_frames(self, images: Sequence[np.ndarray], times: Sequence[float]) -> list[MergedTokens]:
        from pipeline.jobs import fetch

        return fetch(self.encoder.encode_each.remote(list(images), list(times)))

    def answer(self, tokens: MergedTokens, question: str, source: str = "") -> Answer:
        from pipeline.jobs import fetch

        return fetch(self.llm.answer.remote(tokens, question, source))

    def newline(self) -> torch.Tensor | None:
        return self._newline

    def cache_settings(self) -> dict[str, Any]:
        from pipeline.jobs import fetch

        return fetch(self.encoder.engine_cache_settings.remote())

    def close(self) -> None:
        import ray

        for actor in (self.encoder, self.llm):
            ray.kill(actor, no_restart=True)
