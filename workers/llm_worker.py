"""``LLMWorker``: a Ray actor (on a GPU when the cluster has one) that answers questions about merged tokens.

It wraps ``VideoQA.answer`` (VTU prefill and DyRate-pruned decoding). ``stream`` is a Ray streaming
generator: the caller iterates over it and gets the answer's text piece by piece as it is written, then
the finished ``Answer``.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import ray

from dymu.tokens import MergedTokens
from dymu.config import VideoQAConfig
from dymu.videoqa import Answer
from workers.metrics import pipeline_metrics
from workers.vision_encoder import load_videoqa


class LLMWorker:
    """Merged tokens + a question -> ``Answer``; the model is loaded once, when the actor starts."""

    def __init__(self, config: VideoQAConfig, threads: int | None = None):
        self.qa = load_videoqa(config, threads)

    def answer(self, tokens: MergedTokens, question: str, source: str = "") -> Answer:
        answer = self.qa.answer(tokens, question, source=source)
        self._record(answer)
        return answer

    @ray.method(num_returns="streaming")
    def stream(self, tokens: MergedTokens, question: str, source: str = "") -> Iterator[str | Answer]:
        """Yield the answer's text pieces as they are written, then the ``Answer`` itself."""
        pieces: queue.Queue = queue.Queue()
        finished = object()
        outcome: dict[str, object] = {}

        # The model calls back with each piece from inside its decode loop; a thread lets this generator
        # hand every piece to Ray as soon as it exists instead of after the whole answer.
        def write() -> None:
            try:
                outcome["answer"] = self.qa.answer(tokens, question, on_text=pieces.put, source=source)
            except BaseException as exc:  # re-raised below, in the actor's own thread
                outcome["error"] = exc
            finally:
                pieces.put(finished)

        threading.Thread(target=write, name="llm-answer", daemon=True).start()
        while (piece := pieces.get()) is not finished:
            yield piece
        if "error" in outcome:
            raise outcome["error"]
        answer = outcome["answer"]
        self._record(answer)
        yield answer

    def _record(self, answer: Answer) -> None:
        seconds = answer.report["seconds"]
        metrics = pipeline_metrics()
        metrics.stage(self.qa.config.model, "prefill", seconds["prefill"])
        metrics.stage(self.qa.config.model, "decode", seconds["decode"])
