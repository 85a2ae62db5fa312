"""``VisionEncoder``: a Ray actor (on a GPU when the cluster has one) that turns a ``Media`` into merged tokens.

It wraps ``VideoQA.encode`` (DToMe per frame, temporal merging, the projector and the model's layout). The
checkpoint is loaded once, when the actor starts; the LLM worker loads its own copy in its own process
(the price of running the two stages side by side on different jobs).

It is an async actor that batches across jobs: every ``encode`` call joins a queue, and one loop takes
the queued media (up to the config's ``encode_batch_frames`` frames, at least one medium) and encodes them
together on the model's thread (``VideoQA.encode_many``), while new calls keep queueing for the next batch.
A medium that fails fails only its own call.
"""
from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import ray
import torch

from dymu.batch_encode import take_batch
from dymu.errors import DymuError
from dymu.families import load_family
from dymu.tokens import MergedTokens
from dymu.config import VideoQAConfig
from dymu.videoqa import Media, VideoQA
from workers.metrics import pipeline_metrics


def load_videoqa(config: VideoQAConfig, threads: int | None) -> VideoQA:
    """The model of ``config`` in this process; ``threads`` caps torch's CPU threads (None: leave as is)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a worker's log is no terminal
    if threads:
        torch.set_num_threads(threads)
    return VideoQA(load_family(config.model, config.device, config.dtype, config.revision), config)


def media_frames(media: Media) -> int:
    """Frames a medium puts through the encoder, as a batch counts them (an image counts as one)."""
    return len(media.frames) if media.kind == "video" and media.frames is not None else 1


class VisionEncoder:
    """Media -> ``MergedTokens`` (LLM-space rows, on the CPU so that any worker can take them)."""

    def __init__(self, config: VideoQAConfig, threads: int | None = None):
        self.qa = load_videoqa(config, threads)
        # Every use of the model runs on this one thread, in turn; the event loop only queues calls.
        self._model = ThreadPoolExecutor(1, thread_name_prefix="dymu-encoder")
        self._queue: list[tuple[Media, asyncio.Future]] = []
        self._draining: asyncio.Task | None = None
        self.batches = 0
        self.recent_batches: deque[int] = deque(maxlen=1000)  # media per batch, the latest ones

    async def _on_model_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._model, fn, *args)

    async def cache_settings(self, media: Media | None = None) -> dict[str, Any] | None:
        """What, besides the video and the model, decides this encoder's tokens: the config's encoder
        options, the DToMe thresholds in use and the weights' dtype. None while the thresholds are unknown.

        Thresholds the model has none of yet are calibrated on ``media`` (as ``VideoQA`` does on the first
        video); without media that case returns None.
        """
        return await self._on_model_thread(self._cache_settings, media)

    def _cache_settings(self, media: Media | None) -> dict[str, Any] | None:
        try:
            visual = self.qa.visual_tokenizer(media)
        except DymuError:
            if media is not None:
                raise
            return None
        dtype = next(self.qa.family.model.parameters()).dtype
        return {"encoder": self.qa.config.encoder_fingerprint(), "taus": visual.taus, "dtype": str(dtype)}

    @ray.method(num_returns=2)
    async def encode(self, media: Media) -> tuple[dict[str, Any], MergedTokens]:
        """(summary, tokens): the caller fetches the small summary and passes the tokens on by reference."""
        done = asyncio.get_running_loop().create_future()
        self._queue.append((media, done))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
        tokens = await done
        stages, seconds = tokens.meta["stages"], tokens.meta["seconds"]
        model = self.qa.config.model
        metrics = pipeline_metrics()
        metrics.tokens_before.inc(stages["llm_positions"], tags={"model": model})
        metrics.tokens_after.inc(stages["llm_rows"], tags={"model": model})
        metrics.stage(model, "encode", seconds["encode"] + seconds["layout"])
        summary = {"positions": tokens.num_positions, "rows": tokens.num_unique, "seconds": dict(seconds)}
        return summary, tokens

    async def stats(self) -> dict[str, Any]:
        """Batches encoded so far and the media in each of the latest 1000."""
        return {"batches": self.batches, "media_per_batch": list(self.recent_batches)}

    async def _drain(self) -> None:
        """Encode queued media batch after batch until the queue is empty; calls that arrive meanwhile wait
        for the next batch."""
        await asyncio.sleep(0)  # calls delivered together join the first batch too
        while self._queue:
            count = take_batch([media_frames(m) for m, _ in self._queue], self.qa.config.encode_batch_frames)
            batch, self._queue = self._queue[:count], self._queue[count:]
            self.batches += 1
            self.recent_batches.append(count)
            try:
                results = await self._on_model_thread(self._encode_batch, [m for m, _ in batch])
            except Exception as exc:  # noqa: BLE001 - the whole call failed (not one medium): each caller sees it
                results = [exc] * len(batch)
            for (_, done), result in zip(batch, results):
                if done.done():  # the caller went away
                    continue
                if isinstance(result, BaseException):
                    done.set_exception(result)
                else:
                    done.set_result(result)

    def _encode_batch(self, media: list[Media]) -> list[MergedTokens | Exception]:
        return [t if isinstance(t, Exception) else t.to("cpu") for t in self.qa.encode_many(media)]
