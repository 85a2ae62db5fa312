"""``LLMWorker``: a Ray actor (on a GPU when the cluster has one) that answers questions about merged tokens.

It wraps ``VideoQA.answer`` (VTU prefill and DyRate-pruned decoding). ``stream`` is a Ray streaming
generator: the caller iterates over it and gets the answer's text piece by piece as it is written, then
the finished ``Answer``. ``ray.cancel`` on the generator aborts the request (at its next token, or before
it starts when it is still waiting its turn).

Requests take turns on the model (one lock). Started with ``max_concurrency > 1`` (as the server does), the
actor accepts many requests at once, queues them on that lock and answers ``stats()`` at any time.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import ray

from dymu.tokens import MergedTokens
from dymu.config import VideoQAConfig
from dymu.videoqa import Answer, VideoQA
from workers.metrics import pipeline_metrics
from workers.vision_encoder import load_videoqa

# Per-request generation overrides ``options`` may hold, as config fields.
_CONFIG_OPTIONS = ("max_new_tokens", "temperature", "top_p", "seed")


class RequestCancelled(Exception):
    """Raised inside the decode loop of a request whose stream was cancelled, to stop it at once."""


class LLMWorker:
    """Merged tokens + a question -> ``Answer``; the model is loaded once, when the actor starts."""

    def __init__(self, config: VideoQAConfig, threads: int | None = None):
        self.qa = load_videoqa(config, threads)
        self._model_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._counts = {"running": 0, "waiting": 0, "cancelled": 0, "finished": 0}

    def stats(self) -> dict[str, int]:
        """Requests on the model now (running), waiting their turn, and cancelled / finished so far."""
        with self._count_lock:
            return dict(self._counts)

    def answer(self, tokens: MergedTokens, question: str, source: str = "", options: dict | None = None) -> Answer:
        with self._turn():
            answer = self._videoqa(options).answer(tokens, question, source=source, stop=_stop(options))
        self._record(answer)
        return answer

    @ray.method(num_returns="streaming")
    def stream(self, tokens: MergedTokens, question: str, source: str = "",
               options: dict | None = None) -> Iterator[str | Answer]:
        """Yield the answer's text pieces as they are written, then the ``Answer`` itself.

        options: per-request overrides of max_new_tokens, temperature, top_p, seed and stop (strings).
        """
        qa = self._videoqa(options)  # a bad option fails here, before the request waits its turn
        pieces: queue.Queue = queue.Queue()
        finished = object()
        cancel = threading.Event()
        outcome: dict[str, object] = {}

        def emit(text: str) -> None:
            if cancel.is_set():
                raise RequestCancelled()
            pieces.put(text)

        # The model calls back with each piece from inside its decode loop; a thread lets this generator
        # hand every piece to Ray as soon as it exists instead of after the whole answer.
        def write() -> None:
            try:
                with self._turn():
                    if cancel.is_set():
                        raise RequestCancelled()
                    outcome["answer"] = qa.answer(tokens, question, on_text=emit, source=source, stop=_stop(options))
            except BaseException as exc:  # re-raised below, in the actor's own thread
                outcome["error"] = exc
                if isinstance(exc, RequestCancelled):
                    self._count("cancelled")
            finally:
                pieces.put(finished)

        threading.Thread(target=write, name="llm-answer", daemon=True).start()
        context = ray.get_runtime_context()
        try:
            while True:
                try:
                    piece = pieces.get(timeout=0.05)
                except queue.Empty:
                    # A cancel reaches a generator at its next yield; one still waiting its turn has none.
                    if context.is_canceled():
                        return
                    continue
                if piece is finished:
                    break
                yield piece
        finally:
            cancel.set()  # the consumer cancelled (or we are done, when it changes nothing)
        if "error" in outcome:
            raise outcome["error"]
        answer = outcome["answer"]
        self._record(answer)
        yield answer

    def _videoqa(self, options: dict | None) -> VideoQA:
        overrides = {name: options[name] for name in _CONFIG_OPTIONS if options and options.get(name) is not None}
        if not overrides:
            return self.qa
        return VideoQA(self.qa.family, dataclasses.replace(self.qa.config, **overrides))

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """Wait for the model (counted as waiting), then hold it (counted as running)."""
        self._count("waiting")
        try:
            self._model_lock.acquire()
        finally:
            self._count("waiting", -1)
        self._count("running")
        try:
            yield
        finally:
            self._count("running", -1)
            self._model_lock.release()

    def _count(self, name: str, delta: int = 1) -> None:
        with self._count_lock:
            self._counts[name] += delta

    def _record(self, answer: Answer) -> None:
        self._count("finished")
        seconds = answer.report["seconds"]
        metrics = pipeline_metrics()
        metrics.stage(self.qa.config.model, "prefill", seconds["prefill"])
        metrics.stage(self.qa.config.model, "decode", seconds["decode"])


def _stop(options: dict[str, Any] | None) -> tuple[str, ...]:
    stop = (options or {}).get("stop") or ()
    return (stop,) if isinstance(stop, str) else tuple(stop)
