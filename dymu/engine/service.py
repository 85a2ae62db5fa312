"""The engine on a thread of its own, taking requests from any thread: what a server or a worker wraps.

``submit`` queues a request and returns at once; the thread steps the engine while anything is running and
sleeps on its inbox otherwise. Every ``StepOutput`` of a request goes to that request's ``on_output``,
called on the engine thread (keep it short: hand it over to another thread or event loop). A request whose
input is bad gets one output with its error; an unexpected failure of a step fails the requests it was
running, and the thread goes on with the next ones.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

from dymu.engine.engine import Engine
from dymu.engine.request import StepOutput
from dymu.errors import DymuError
from dymu.llm.config import GenerateConfig
from dymu.llm.sequence import VirtualSequence

log = logging.getLogger(__name__)

OnOutput = Callable[[StepOutput], Any]


class EngineThread:
    """``engine`` driven by a daemon thread; ``close`` stops it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._handlers: dict[int, OnOutput] = {}
        self._stats: dict[str, Any] = engine.stats()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="dymu-engine", daemon=True)
        self._thread.start()

    def submit(self, sequence: VirtualSequence, config: GenerateConfig, on_output: OnOutput,
               prefix_key: str | None = None, prefix_positions: int | None = None) -> threading.Event:
        """Queue a request; returns an event set once it has an id (``ticket.request_id``, None if refused)."""
        ticket = threading.Event()
        ticket.request_id = None  # type: ignore[attr-defined]
        self._inbox.put(("add", (sequence, config, on_output, prefix_key, prefix_positions), ticket))
        return ticket

    def abort(self, ticket: threading.Event) -> None:
        """Drop the request of ``ticket`` (queued or running); its memory goes back at the next step."""
        self._inbox.put(("abort", None, ticket))

    def stats(self) -> dict[str, Any]:
        """The engine's figures as of its last step (at least ``running`` and ``waiting``)."""
        return dict(self._stats)

    def close(self) -> None:
        self._stopping = True
        self._inbox.put(("stop", None, None))
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stopping:
            self._drain(block=not self.engine.has_unfinished())
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # not one request's fault: fail those in flight, keep serving
                log.exception("engine step failed")
                outputs = self._fail_running(f"{type(exc).__name__}: {exc}")
            for out in outputs:
                handler = self._handlers.pop(out.request_id, None) if out.finished else self._handlers.get(out.request_id)
                if handler is not None:
                    handler(out)
            self._stats = self.engine.stats()

    def _drain(self, block: bool) -> None:
        try:
            command = self._inbox.get(block=block)
        except queue.Empty:
            return
        while True:
            self._handle(*command)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload: Any, ticket: threading.Event | None) -> None:
        if kind == "add":
            sequence, config, on_output, prefix_key, prefix_positions = payload
            try:
                request_id = self.engine.add_request(sequence, config, prefix_key, prefix_positions)
            except DymuError as exc:
                on_output(StepOutput(-1, None, True, None, str(exc)))
            else:
                self._handlers[request_id] = on_output
                ticket.request_id = request_id  # type: ignore[union-attr]
            ticket.set()  # type: ignore[union-attr]
            self._stats = self.engine.stats()
        elif kind == "abort":
            request_id = getattr(ticket, "request_id", None)
            if request_id is not None and self.engine.abort(request_id):
                self._handlers.pop(request_id, None)
            self._stats = self.engine.stats()

    def _fail_running(self, error: str) -> list[StepOutput]:
        outputs = []
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            outputs.append(StepOutput(request_id, None, True, None, error))
        return outputs
