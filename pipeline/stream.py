"""Following live feeds: the Python API behind `dymu-video stream`.

    with open_streams(["rtsp://cam/stream1", "udp://127.0.0.1:5000"], "Describe what changed.",
                      every_s=10, window_s=60, model="llava-hf/llava-onevision-qwen2-0.5b-ov-hf") as streams:
        for result in streams:              # one StreamResult per feed every 10 s of feed, until Ctrl-C
            print(result.to_text())
            if "door" in result.answer:     # on demand, now, over each feed's window (any thread may ask)
                print(streams.ask("Is anyone at the door?")[0].answer)

Each feed has its own reader process (``pipeline.ingest``) and its own token memory (``dymu.memory``); the
feeds share one engine (encoder and LLM). Frames are encoded one batch per feed as they arrive, merged into
the feed's memory (so a static scene adds almost nothing) and evicted past the window; every ``every_s``
seconds of a feed, the LLM answers over its window. While an answer is written the readers keep reading;
their bounded queues drop the oldest frames if the pipeline falls behind, and results say so.

The engine (encoder and LLM, ``pipeline.stream_engine``) runs in this process or as Ray actors.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from dymu.errors import DymuError
from dymu.layout import append_learned_row
from dymu.memory import TokenMemory, append_frame, assemble, evict
from dymu.temporal import merge_frames
from dymu.tokens import MergedTokens
from dymu.config import make_config
from dymu.visual_qwen import feed_video_metadata
from pipeline.ingest import FeedOptions, FeedReader, Gap
from pipeline.stream_engine import Engine, LocalEngine
from workers.redis_server import CacheUnavailable
from workers.token_cache import TokenCache, live_source_id, token_cache_key

log = logging.getLogger(__name__)


# --- one feed's memory, and its chunks in Redis --------------------------------------------------------
class ChunkStore:
    """A feed's tokens in the Redis token cache, one entry per ``chunk_s`` seconds of feed.

    Keys are the token cache's, from ``live_source_id(feed, time, chunk_s)``, so any process with the same
    settings can read a feed's recent past. An entry is deleted once the window no longer covers any of
    it, and carries a TTL so that what a crashed run leaves behind expires too. Redis failing is logged
    once and ends the writing, never the stream.
    """

    def __init__(self, cache: TokenCache, feed_id: str, model: str, revision: str, settings: dict[str, Any],
                 chunk_s: float, ttl_s: int, threshold: float):
        self.cache = cache
        self.feed_id = feed_id
        self.made_with = (model, revision, settings)
        self.chunk_s = chunk_s
        self.ttl_s = ttl_s
        self.threshold = threshold
        self.open_chunk: int | None = None
        self.open_frames: list[MergedTokens] = []
        self.written: deque[tuple[float, str]] = deque()  # (chunk end time, key), oldest first
        self.broken = False

    def key(self, chunk: int) -> str:
        model, revision, settings = self.made_with
        return token_cache_key(live_source_id(self.feed_id, chunk * self.chunk_s, self.chunk_s), model, revision, settings)

    def add(self, frame: MergedTokens) -> None:
        chunk = math.floor(frame.timestamps[0] / self.chunk_s)
        if chunk != self.open_chunk:
            self.flush()
            self.open_chunk = chunk
        self.open_frames.append(frame)

    def flush(self) -> None:
        """Write the open chunk (its frames temporally merged, as one value)."""
        frames, self.open_frames = self.open_frames, []
        if not frames or self.broken:
            return
        key = self.key(self.open_chunk)
        chunk = merge_frames(frames, self.threshold)
        if self._redis(lambda: self.cache.put(key, chunk, ttl_s=self.ttl_s)):
            self.written.append(((self.open_chunk + 1) * self.chunk_s, key))

    def forget_before(self, time_s: float) -> None:
        """Delete the entries that end at or before ``time_s`` (the window's start)."""
        while self.written and self.written[0][0] <= time_s and not self.broken:
            _, key = self.written.popleft()
            self._redis(lambda: self.cache.delete(key))

    def keys(self) -> list[str]:
        return [key for _, key in self.written]

    def _redis(self, call) -> bool:
        try:
            call()
            return True
        except CacheUnavailable as exc:
            log.warning("%s: the token cache failed, going on without writing chunks: %s", self.feed_id, exc)
            self.broken = True
            return False


class FeedMemory:
    """A feed's token memory over the window (by time, frame count and row budget), plus its chunks."""

    def __init__(self, window_s: float, threshold: float, max_frames: int | None = None,
                 token_budget: int | None = None, chunks: ChunkStore | None = None):
        self.window_s = window_s
        self.threshold = threshold
        self.max_frames = max_frames
        self.token_budget = token_budget
        self.chunks = chunks
        self.state: TokenMemory | None = None
        self.rows_added = 0

    def add(self, frames: Sequence[MergedTokens]) -> None:
        for frame in frames:
            if self.state is not None and frame.meta.get("grid_thw") != self.state.frames[-1].meta.get("grid_thw"):
                # Qwen-VL: one video has one grid, and the feed's size changed (a reconnect): start over.
                log.info("the feed's frames changed size (grid %s): its memory starts over", frame.meta["grid_thw"])
                self.state = None
            self.state = append_frame(self.state, frame, self.threshold)
            self.rows_added += self.state.frames[-1].new_rows
            if self.chunks is not None:
                self.chunks.add(frame)
        self.state = evict(self.state, since=self.state.end - self.window_s, max_frames=self.max_frames,
                           max_rows=self.token_budget)
        if self.chunks is not None:
            self.chunks.forget_before(self.state.start)

    def window(self, newline: torch.Tensor | None) -> MergedTokens:
        """The window for the LLM, with the per-stage counts ``VideoQA.answer`` reports (per frame, or per
        Qwen-VL temporal slot) and, for Qwen-VL, what its prompt needs (``qwen_window_meta``)."""
        frames = self.state.frames
        tokens = assemble(self.state)
        tokens.meta = {
            "kind": "video",
            "frames": self.state.sampled_frames,
            "slots": len(frames),
            "stages": {
                "encoder_tokens_per_frame": frames[0].meta.get("encoder_tokens", frames[0].positions),
                "dtome_tokens_per_frame": [frame.meta.get("dtome_tokens", frame.rows) for frame in frames],
                "layout_rows_per_frame": [frame.rows for frame in frames],
                "temporal_rows_per_frame": tokens.rows_per_frame(),
            },
            "seconds": {},
        }
        if "grid_thw" in frames[0].meta:
            tokens.meta |= qwen_window_meta(self.state)
        if newline is not None:
            tokens = append_learned_row(tokens, newline)
        tokens.meta["stages"] |= {"llm_positions": tokens.num_positions, "llm_rows": tokens.num_unique}
        return tokens


def qwen_window_meta(memory: TokenMemory) -> dict[str, Any]:
    """A Qwen-VL window's grid (its slots, each slot's h x w patches) and ``video_metadata`` (its frames'
    times from the window's first), from which the family builds the prompt and M-RoPE positions as for a
    file's frames."""
    _, h, w = memory.frames[0].meta["grid_thw"]
    times = [frame.frame_times or (frame.time,) for frame in memory.frames]
    return {"grid_thw": [memory.num_frames, h, w], "video_metadata": feed_video_metadata(times)}


# --- results -------------------------------------------------------------------------------------------
@dataclass
class StreamResult:
    """One answer about one feed's recent past. Times are wall-clock seconds (``time.time()``)."""

    feed: str
    question: str
    answer: str
    start: float  # oldest frame in the window
    end: float  # newest frame in the window
    time: float  # when the answer was finished
    frames: int  # frames in the window
    tokens: int  # visual rows in memory: what the LLM was fed for the window
    positions: int  # visual positions those rows stand for
    first_new: float  # oldest frame no earlier result covered
    answer_s: float  # the LLM's time for this answer
    frames_received: int  # frames sampled from the feed so far
    frames_dropped: int  # of those, dropped because the pipeline fell behind
    lag_s: float  # age of the oldest frame waiting when the encoder last took a batch
    reconnects: int  # times the feed came back so far
    gaps: list[Gap] = field(default_factory=list)  # outages since the previous result
    on_demand: bool = False
    llm: dict[str, Any] = field(default_factory=dict)

    @property
    def latency_s(self) -> float:
        """From the newest frame's arrival to this answer."""
        return self.time - self.end

    @property
    def max_latency_s(self) -> float:
        """From the arrival of the oldest frame this answer was the first to cover."""
        return self.time - self.first_new

    def to_json(self) -> dict[str, Any]:
        return {
            "feed": self.feed, "question": self.question, "answer": self.answer, "start": self.start,
            "end": self.end, "time": self.time, "frames": self.frames, "tokens": self.tokens,
            "positions": self.positions, "latency_s": self.latency_s, "max_latency_s": self.max_latency_s,
            "answer_s": self.answer_s, "frames_received": self.frames_received,
            "frames_dropped": self.frames_dropped, "lag_s": self.lag_s, "reconnects": self.reconnects,
            "gaps": [gap.to_json() for gap in self.gaps], "on_demand": self.on_demand, "llm": self.llm,
        }

    def to_text(self) -> str:
        lines = [
            f"[{_clock(self.start)} - {_clock(self.end)}] {self.feed}: {self.frames} frames, {self.tokens} tokens, "
            f"answered {self.latency_s:.1f} s after the newest frame",
            f"  {self.answer}",
        ]
        for gap in self.gaps:
            lines.append(f"  feed away {_clock(gap.start)} - {_clock(gap.end)} ({gap.seconds:.1f} s, "
                         f"{gap.attempts} reconnect attempt(s)): {gap.reason}")
        if self.frames_dropped:
            lines.append(f"  {self.frames_dropped} of {self.frames_received} frames dropped so far "
                         f"(the pipeline was {self.lag_s:.1f} s behind)")
        return "\n".join(lines)


def _clock(time_s: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(time_s))


# --- the runner ----------------------------------------------------------------------------------------
@dataclass
class _Feed:
    reader: FeedReader
    memory: FeedMemory
    next_due: float | None = None
    first_new: float | None = None
    lag_s: float = 0.0
    reconnects: int = 0
    gaps: list[Gap] = field(default_factory=list)
    done: bool = False
    pending: list = field(default_factory=list)  # a frame waiting for its temporal slot's second (Qwen-VL)

    @property
    def name(self) -> str:
        return self.reader.name


class LiveStreams:
    """Several feeds, one engine: iterate for the scheduled results, ``ask`` for one now.

    readers: started and connected ``FeedReader``s (closed by ``close``). every_s: seconds of feed between
    answers. window_s / token_budget: what the memory keeps (the config's ``max_frames`` caps its frames).
    cache: a ``TokenCache`` to keep each feed's chunks in (None: none). Iteration ends when every feed has
    ended (files); live feeds go on until ``close``.
    """

    def __init__(self, readers: Sequence[FeedReader], engine: Engine, question: str, every_s: float = 10.0,
                 window_s: float = 60.0, token_budget: int | None = None, cache: TokenCache | None = None,
                 chunk_s: float = 10.0):
        if every_s <= 0 or window_s <= 0:
            raise DymuError("the answer interval and the window must be positive")
        if token_budget is not None and token_budget < 1:
            raise DymuError(f"the token budget must be >= 1, got {token_budget}")
        self.engine = engine
        self.question = question
        self.every_s = every_s
        self.cache = cache
        self.chunk_s = chunk_s
        threshold = engine.config.temporal_threshold
        self.feeds = [_Feed(reader, FeedMemory(window_s, threshold, engine.config.max_frames, token_budget))
                      for reader in readers]
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[StreamResult]:
        # Waiting on one feed for its next frame returns as soon as it comes; the feeds share 0.1 s.
        wait_s = 0.1 / len(self.feeds)
        while not all(feed.done for feed in self.feeds):
            for feed in self.feeds:
                if feed.done:
                    continue
                with self._lock:
                    result = self._step(feed, wait_s)
                if result is not None:
                    yield result

    def ask(self, question: str, feed: str | None = None) -> list[StreamResult]:
        """Answer ``question`` now over the current window of every feed (or the one named ``feed``)."""
        results = []
        with self._lock:
            for state in self.feeds:
                if feed is not None and state.name != feed:
                    continue
                self._take(state)
                if state.memory.state is not None:
                    results.append(self._answer(state, question, on_demand=True))
        return results

    def close(self) -> None:
        for feed in self.feeds:
            feed.reader.close()
            if feed.memory.chunks is not None:
                feed.memory.chunks.flush()

    def __enter__(self) -> "LiveStreams":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- inside ------------------------------------------------------------------------------------------
    def _step(self, feed: _Feed, wait_s: float) -> StreamResult | None:
        """Take the feed's waiting frames; return a result if one is due (or the file ended)."""
        took = self._take(feed, wait_s)
        memory = feed.memory.state
        if memory is not None and feed.next_due is not None and memory.end >= feed.next_due:
            return self._answer(feed, self.question)
        if feed.reader.ended and not took:
            feed.done = True
            if feed.first_new is not None:  # frames no answer has covered yet
                return self._answer(feed, self.question)
        return None

    def _take(self, feed: _Feed, wait_s: float = 0.0) -> int:
        """Encode the feed's waiting frames into its memory; return how many came from the reader."""
        came = feed.reader.frames(timeout=wait_s)
        feed.gaps += [frame.gap for frame in came if frame.gap is not None]
        feed.reconnects += sum(frame.gap is not None for frame in came)
        # Qwen-VL encodes two frames per temporal slot: an odd frame waits for the next, unless the file ended.
        frames = feed.pending + came
        waiting = 0 if feed.reader.ended and not came else len(frames) % self.engine.frames_per_slot
        frames, feed.pending = frames[: len(frames) - waiting], frames[len(frames) - waiting:]
        if not frames:
            return len(came)
        feed.lag_s = time.time() - frames[0].time
        times = [frame.time for frame in frames]
        tokens = self.engine.encode_frames([frame.image for frame in frames], times)
        if self.cache is not None and feed.memory.chunks is None:
            feed.memory.chunks = self._chunk_store(feed)
        feed.memory.add(tokens)
        feed.first_new = times[0] if feed.first_new is None else feed.first_new
        feed.next_due = times[0] + self.every_s if feed.next_due is None else feed.next_due
        return len(came)

    def _answer(self, feed: _Feed, question: str, on_demand: bool = False) -> StreamResult:
        tokens = feed.memory.window(self.engine.newline())
        memory = feed.memory.state
        started = time.time()
        answer = self.engine.answer(tokens, question, source=feed.name)
        finished = time.time()
        result = StreamResult(
            feed=feed.name, question=question, answer=answer.text, start=memory.start, end=memory.end,
            time=finished, frames=memory.sampled_frames, tokens=memory.num_rows, positions=memory.num_positions,
            first_new=feed.first_new if feed.first_new is not None else memory.end, answer_s=finished - started,
            frames_received=feed.reader.sampled, frames_dropped=feed.reader.dropped, lag_s=feed.lag_s,
            reconnects=feed.reconnects, gaps=feed.gaps, on_demand=on_demand, llm=answer.report["llm"],
        )
        feed.gaps, feed.first_new = [], None
        if not on_demand:
            while feed.next_due <= memory.end:
                feed.next_due += self.every_s
        return result

    def _chunk_store(self, feed: _Feed) -> ChunkStore:
        config = self.engine.config
        ttl_s = math.ceil(feed.memory.window_s + 2 * self.chunk_s)
        return ChunkStore(self.cache, feed.reader.url, config.model, config.revision or "",
                          self.engine.cache_settings(), self.chunk_s, ttl_s, config.temporal_threshold)


def connect_feeds(urls: Sequence[str], options: FeedOptions) -> list[FeedReader]:
    """Start one reader per feed and wait until all have connected; on any failure, close them all."""
    readers: list[FeedReader] = []
    try:
        for url in urls:
            readers.append(FeedReader(url, options).start())
        for reader in readers:
            reader.wait_connected()
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return readers


def open_streams(urls: Sequence[str], question: str, every_s: float = 10.0, window_s: float = 60.0,
                 token_budget: int | None = None, feed_options: FeedOptions = FeedOptions(),
                 redis_url: str | None = None, engine: Engine | None = None, model: str | None = None,
                 preset: str | None = None, **overrides: Any) -> LiveStreams:
    """Connect to ``urls`` and return the running ``LiveStreams``.

    engine: the shared encoder and LLM (e.g. a ``RayEngine``); None loads ``model`` in this process, with
    ``preset`` and config ``overrides`` as for ``VideoQA.from_pretrained`` (on a CPU it then sets torch's
    thread count so that every reader keeps a core). redis_url: keep each feed's token
    chunks in that Redis. The feeds are connected first, so that an unreachable one fails before any loading.
    """
    config = make_config(preset, model=model, **overrides) if engine is None else engine.config
    readers = connect_feeds(urls, feed_options)
    try:
        engine = engine or LocalEngine.from_config(config, feeds=len(readers))
        cache = TokenCache(redis_url) if redis_url else None
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return LiveStreams(readers, engine, question, every_s, window_s, token_budget, cache)
