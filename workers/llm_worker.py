"""``LLMWorker``: a Ray actor (on a GPU when the cluster has one) that answers questions about merged tokens.

An async actor around one batched engine (``dymu.engine``) running on a thread of its own: every call is a
request to that engine, so concurrent calls are answered together, up to the config's ``max_batch`` at a
time (continuous batching), and a second question about a video reuses its visual prefix. ``stream`` is a
Ray streaming generator: the answer's text piece by piece as it is written, then the finished ``Answer``.
Cancelling it (``ray.cancel`` on the generator) aborts the request and frees its memory at once.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import ray

from dymu.answer import TextStream
from dymu.config import VideoQAConfig
from dymu.engine.request import StepOutput
from dymu.engine.service import EngineThread
from dymu.errors import DymuError
from dymu.tokens import MergedTokens
from dymu.videoqa import Answer
from workers.metrics import pipeline_metrics
from workers.vision_encoder import load_videoqa


class LLMWorker:
    """Merged tokens + a question -> ``Answer``; the model is loaded once, when the actor starts."""

    def __init__(self, config: VideoQAConfig, threads: int | None = None):
        self.qa = load_videoqa(config, threads)
        self.engine = EngineThread(self.qa.make_engine())
        self.cancelled = 0  # requests whose caller went away before their answer
        self.finished = 0

    async def answer(self, tokens: MergedTokens, question: str, source: str = "",
                     options: dict[str, Any] | None = None) -> Answer:
        async for item in self._write(tokens, question, source, options, with_text=False):
            if isinstance(item, Answer):
                return item
        raise RuntimeError("the engine ended the request without an answer")

    @ray.method(num_returns="streaming")
    async def stream(self, tokens: MergedTokens, question: str, source: str = "",
                     options: dict[str, Any] | None = None) -> AsyncIterator[str | Answer]:
        """Yield the answer's text pieces as they are written, then the ``Answer`` itself."""
        async for item in self._write(tokens, question, source, options, with_text=True):
            yield item

    async def stats(self) -> dict[str, Any]:
        """The engine's figures (running and waiting requests, KV blocks, prefix-cache hits...), and how many
        answers this worker finished and how many were cancelled by their caller."""
        return {**self.engine.stats(), "cancelled": self.cancelled, "finished": self.finished}

    async def _write(self, tokens: MergedTokens, question: str, source: str, options: dict[str, Any] | None,
                     with_text: bool) -> AsyncIterator[str | Answer]:
        sequence, config, prefix_key, prefix_positions = self.qa.answer_request(tokens, question, options)
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        text = TextStream(self.qa.family.tokenizer, inbox.put_nowait) if with_text else None

        def on_output(out: StepOutput) -> None:  # on the engine's thread
            loop.call_soon_threadsafe(deliver, out)

        def deliver(out: StepOutput) -> None:
            if text is not None and out.token is not None:
                text(out.token)
            if out.finished:
                inbox.put_nowait(out)

        ticket = self.engine.submit(sequence, config, on_output, prefix_key, prefix_positions)
        finished = False
        try:
            while not isinstance(item := await inbox.get(), StepOutput):
                yield item
            finished = True
            if item.error is not None:
                raise DymuError(item.error)
            answer = self.qa.finish_answer(tokens, question, item.result, source,
                                           "hit" if item.prefix_hit else "miss")
            self._record(answer)
            yield answer
        finally:
            if not finished:  # cancelled or dropped: free its memory now
                self.cancelled += 1
                self.engine.abort(ticket)

    def _record(self, answer: Answer) -> None:
        self.finished += 1
        seconds = answer.report["seconds"]
        metrics = pipeline_metrics()
        metrics.stage(self.qa.config.model, "prefill", seconds["prefill"])
        metrics.stage(self.qa.config.model, "decode", seconds["decode"])
