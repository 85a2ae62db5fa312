"""Live feed ingest: one reader process per feed, so that a hung native read never freezes the pipeline.

A reader opens the feed with PyAV (FFmpeg): rtsp (over TCP), http(s), udp, rtmp, a v4l2 device
(``/dev/video*``) or a file, played at its own rate with ``realtime`` or else as fast as it decodes. It
decodes every frame, keeps one every ``1 / sample_fps`` seconds, shrinks it, stamps it with the wall-clock
time it arrived (``ArrivalClock``; a file: its start time plus the frame's media time) and hands it over
through a bounded queue. When the pipeline falls behind and the queue is full, the reader drops the OLDEST waiting frame to
make room (a live answer wants the newest frames) and counts it; a file read as fast as it decodes waits
for room instead, since nothing is lost by waiting.

Faults, from the inside out:
* FFmpeg's socket timeouts (``timeout`` / ``rw_timeout``, microseconds) and PyAV's interrupt timeout bound
  every open and every read;
* a watchdog in the reader reconnects when no frame has come for ``stall_timeout_s`` although packets do;
* a watchdog in the parent kills and restarts a reader whose process stopped beating altogether (a
  native call stuck past every timeout) or died.
Reconnects back off exponentially up to ``max_backoff_s``; the first frame after one carries the ``Gap``.
A feed that never connects is an error (``FeedUnavailable``) once the connect timeout has passed.
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import queue
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlsplit

import av
import numpy as np

from dymu.errors import DymuError
from workers.redis_server import redact_url

log = logging.getLogger(__name__)

# Seconds a new reader process may take to start (spawn imports Python and PyAV) on top of its connect timeout.
_START_GRACE_S = 20.0
# The parent restarts a reader that has not beaten for its connect plus stall timeouts plus this much.
_HANG_GRACE_S = 10.0
_HEARTBEAT_SLICE_S = 0.25
# The longest the parent waits for the queue's lock when it asks for frames without a timeout.
_LOCK_WAIT_S = 0.1


class FeedUnavailable(DymuError):
    """A feed that cannot be opened at all: unreachable, refused, not a video, or a missing file."""


@dataclass(frozen=True)
class FeedOptions:
    """How a feed is read.

    sample_fps: frames kept per second of feed. connect_timeout_s: opening (and each read of) the feed.
    stall_timeout_s: no frame for this long means the feed is gone: reconnect. backoff_s / max_backoff_s:
    the first wait before reconnecting and its cap (doubling in between). queue_frames: frames waiting for
    the pipeline before the oldest is dropped. realtime: play a file at its own rate. max_side: frames
    are shrunk to this longest side in the reader (the model resizes them anyway; this keeps a 4K feed
    from crossing process boundaries at full size).
    """

    sample_fps: float = 1.0
    connect_timeout_s: float = 5.0
    stall_timeout_s: float = 10.0
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    queue_frames: int = 8
    realtime: bool = False
    max_side: int = 768

    def __post_init__(self) -> None:
        if not self.sample_fps > 0:
            raise DymuError(f"the sample rate must be > 0 frames/s, got {self.sample_fps}")
        for name in ("connect_timeout_s", "stall_timeout_s", "backoff_s", "max_backoff_s"):
            if not getattr(self, name) > 0:
                raise DymuError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.queue_frames < 1 or self.max_side < 16:
            raise DymuError("queue_frames must be >= 1 and max_side >= 16")


@dataclass(frozen=True)
class Gap:
    """A time the feed was away: from its last frame before to its first frame after."""

    start: float
    end: float
    attempts: int  # connection attempts it took to come back
    reason: str

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "seconds": self.seconds, "attempts": self.attempts,
                "reason": self.reason}


@dataclass
class Frame:
    """One sampled frame: (H, W, 3) uint8 RGB and the wall-clock time it arrived."""

    image: np.ndarray
    time: float
    gap: Gap | None = None  # set on the first frame after the feed came back


# --- where a feed comes from ---------------------------------------------------------------------------
def source_kind(url: str) -> str:
    """"device" (a v4l2 camera), "file" (a local file) or "network" (anything with a scheme)."""
    if url.startswith("/dev/video"):
        return "device"
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file" or len(scheme) <= 1:  # no scheme, or a Windows drive letter
        return "file"
    return "network"


def open_options(url: str, connect_timeout_s: float) -> dict[str, str]:
    """FFmpeg options for opening ``url``: a short probe for a fast start, socket timeouts per protocol."""
    micros = str(int(connect_timeout_s * 1_000_000))
    options = {"analyzeduration": "1000000", "probesize": "1000000"}  # FFmpeg's defaults: 5 s and 5 MB
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("rtsp", "rtsps"):
        # TCP: no lost packets behind a NAT; stimeout is the same timeout for FFmpeg before 5.0.
        options.update(rtsp_transport="tcp", timeout=micros, stimeout=micros)
    elif scheme in ("http", "https", "tcp", "udp"):
        options["timeout"] = micros  # for rtmp "timeout" would mean listen mode: rw_timeout only
    if source_kind(url) == "network":
        options["rw_timeout"] = micros  # any protocol: one read or write
    return options


def open_feed(url: str, options: FeedOptions) -> av.container.InputContainer:
    """The opened feed; PyAV's own timeout also bounds what the socket options do not cover."""
    kind = source_kind(url)
    timeout = (options.connect_timeout_s, options.stall_timeout_s)
    if kind == "device":
        return av.open(url, format="v4l2", timeout=timeout)
    path = url[len("file://"):] if url.startswith("file://") else url
    if kind == "file":
        return av.open(path)
    return av.open(url, options=open_options(url, options.connect_timeout_s), timeout=timeout)


def check_source(url: str) -> None:
    """Fail at once on what needs no connection attempt: a file or device that is not there."""
    kind = source_kind(url)
    path = url[len("file://"):] if url.startswith("file://") else url
    if kind in ("file", "device") and not os.path.exists(path):
        raise FeedUnavailable(f"{url}: no such {kind}")


def describe_error(exc: BaseException, timeout_s: float) -> str:
    """One line for why a feed could not be opened or read (``timeout_s``: the limit that applied)."""
    if isinstance(exc, av.error.ExitError):  # PyAV's interrupt timeout fired
        return f"no data within {timeout_s:g} s"
    if isinstance(exc, av.error.FFmpegError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


# --- the reader process --------------------------------------------------------------------------------
class StopSignal:
    """What a reader checks to know it must stop: the parent asked, or the parent is gone (killed), so that
    no reader outlives the program.

    A flag in shared memory rather than a ``multiprocessing.Event``: setting an Event waits for every
    process waiting on it to wake, and waits forever for one that was killed while waiting (a hung reader
    the watchdog killed, or one a SIGKILL to the process group reached first).
    """

    def __init__(self, context: Any):
        self._flag = context.Value("b", 0, lock=False)
        self._parent = os.getpid()

    def set(self) -> None:
        self._flag.value = 1

    def is_set(self) -> bool:
        return bool(self._flag.value) or os.getppid() != self._parent


class FeedStalled(Exception):
    """Packets come, frames do not."""


class Sampler:
    """Keeps one frame per ``period`` seconds on a fixed grid; after a pause the grid restarts."""

    def __init__(self, fps: float):
        self.period = 1.0 / fps
        self.next_due: float | None = None

    def take(self, t: float) -> bool:
        if self.next_due is not None and t < self.next_due:
            return False
        on_schedule = self.next_due is not None and t < self.next_due + self.period
        self.next_due = self.next_due + self.period if on_schedule else t + self.period
        return True


def to_rgb(frame: av.VideoFrame, max_side: int) -> np.ndarray:
    """The frame as (H, W, 3) uint8 RGB, shrunk so its longer side is at most ``max_side``."""
    scale = min(1.0, max_side / max(frame.width, frame.height))
    width, height = (max(2, 2 * round(side * scale / 2)) for side in (frame.width, frame.height))
    return frame.to_ndarray(format="rgb24", width=width, height=height)


def pause(stop: Any, seconds: float, heartbeat: Any) -> None:
    """Sleep ``seconds`` or until stopped, beating the heartbeat meanwhile."""
    deadline = time.monotonic() + seconds
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        heartbeat.value = time.time()
        time.sleep(min(left, _HEARTBEAT_SLICE_S))


class ArrivalClock:
    """When a live feed's frames arrived, on the wall clock, from their media times.

    A frame is decoded some time after its data came in: behind the decoder's reordering delay, and at a cut
    only when the read timeout makes the demuxer flush what it held, seconds later. Its media time does not
    wait, so a frame is stamped at its media time plus the smallest (decode time - media time) of the last
    ``window_s`` (the feed's own delay; the window follows a camera clock that drifts). A media clock that
    jumps back (a reset, a wrap) or a stamp more than ``max_lag_s`` behind its decode time starts it over.
    """

    def __init__(self, max_lag_s: float, window_s: float = 60.0):
        self.max_lag_s = max_lag_s
        self.window_s = window_s
        self._offsets: deque[tuple[float, float]] = deque()  # (decoded at, offset), offsets increasing
        self._last = -math.inf

    def stamp(self, media_time: float | None, now: float) -> float:
        if media_time is None:
            return now
        offset = now - media_time
        while self._offsets and self._offsets[0][0] < now - self.window_s:
            self._offsets.popleft()
        while self._offsets and self._offsets[-1][1] >= offset:
            self._offsets.pop()
        self._offsets.append((now, offset))
        t = media_time + self._offsets[0][1]
        if t < self._last or now - t > self.max_lag_s:
            self._offsets.clear()
            self._offsets.append((now, offset))
            t = now
        self._last = t
        return t


def sampled_frames(
    container: av.container.InputContainer, url: str, options: FeedOptions, stop: Any, heartbeat: Any
) -> Iterator[tuple[np.ndarray, float]]:
    """(image, time) of the frames the sampler keeps, until the feed ends, stalls or we are stopped."""
    stream = container.streams.video[0]
    file = source_kind(url) == "file"
    sampler = Sampler(options.sample_fps)
    arrivals = ArrivalClock(max_lag_s=options.connect_timeout_s + options.stall_timeout_s)
    started = time.time()
    first_media_time: float | None = None
    last_frame = time.monotonic()
    for packet in container.demux(stream):
        if stop.is_set():
            return
        heartbeat.value = time.time()
        for frame in packet.decode():
            last_frame = time.monotonic()
            if file and frame.time is not None:
                first_media_time = frame.time if first_media_time is None else first_media_time
                t = started + frame.time - first_media_time
                if options.realtime:
                    pause(stop, t - time.time(), heartbeat)
            else:
                t = arrivals.stamp(frame.time, time.time())
            if sampler.take(t):
                yield to_rgb(frame, options.max_side), t
        if time.monotonic() - last_frame > options.stall_timeout_s:
            raise FeedStalled(f"no frame for {options.stall_timeout_s:g} s")


def offer_dropping_oldest(frames: Any, item: Frame, attempts: int = 20) -> int:
    """Put ``item`` in the bounded queue; while it is full, take the oldest waiting frame out. Returns how
    many frames were dropped (``item`` itself, last, if the queue stayed full for all ``attempts``)."""
    dropped = 0
    for _ in range(attempts):
        try:
            frames.put_nowait(item)
            return dropped
        except queue.Full:
            try:
                frames.get(timeout=0.05)
                dropped += 1
            except queue.Empty:  # the pipeline took one meanwhile
                pass
    return dropped + 1


def put_waiting(frames: Any, item: Frame, stop: Any, heartbeat: Any) -> None:
    """Put ``item`` in the bounded queue, waiting for room as long as it takes (a file loses nothing by waiting)."""
    while not stop.is_set():
        heartbeat.value = time.time()
        try:
            frames.put(item, timeout=_HEARTBEAT_SLICE_S)
            return
        except queue.Full:
            continue


def read_feed(url: str, options: FeedOptions, frames: Any, events: Any, stop: Any, counters: Any,
              heartbeat: Any, lost_at: float | None = None) -> None:
    """The reader process: connect, decode, sample, hand over; reconnect until stopped.

    events get ("connected", ""), ("lost", reason), ("failed", reason) before the first connection (the
    process then ends), and ("ended", "") at the end of a file. counters: shared [sampled, dropped].
    lost_at: the last frame's time when this reader replaces one that hung (it has connected before).
    """
    # Ctrl-C and a SIGTERM to the process group (timeout, docker stop) reach us too: the parent stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kind = source_kind(url)
    connected = lost_at is not None
    backoff, attempts, reason = options.backoff_s, int(lost_at is not None), "the reader was restarted"
    last_frame = lost_at
    while not stop.is_set():
        heartbeat.value = time.time()
        opened = False
        try:
            with open_feed(url, options) as container:
                opened = True
                if not container.streams.video:
                    raise FeedUnavailable("no video stream")
                events.put(("connected", ""))
                connected = True
                for image, t in sampled_frames(container, url, options, stop, heartbeat):
                    gap = Gap(lost_at, t, attempts, reason) if lost_at is not None else None
                    lost_at, attempts, backoff, last_frame = None, 0, options.backoff_s, t
                    counters[0] += 1
                    if kind == "file" and not options.realtime:
                        put_waiting(frames, Frame(image, t, gap), stop, heartbeat)
                    else:
                        counters[1] += offer_dropping_oldest(frames, Frame(image, t, gap))
            if kind == "file" and not stop.is_set():
                frames.close()
                frames.join_thread()  # every frame is in the pipe before the parent hears of the end
                events.put(("ended", ""))
                return
            reason = "the feed ended"
        except (av.error.FFmpegError, OSError, FeedStalled, FeedUnavailable) as exc:
            reason = describe_error(exc, options.stall_timeout_s if opened else options.connect_timeout_s)
            if not connected:
                events.put(("failed", reason))
                return
        if stop.is_set():
            break
        lost_at = lost_at if lost_at is not None else (last_frame or time.time())
        attempts += 1
        events.put(("lost", f"{reason}; reconnecting in {backoff:g} s"))
        pause(stop, backoff, heartbeat)
        backoff = min(2 * backoff, options.max_backoff_s)
    frames.cancel_join_thread()  # stopped: frames still buffered are dropped, not waited for


# --- the parent's end ----------------------------------------------------------------------------------
def take_waiting(frames: Any, limit: int, timeout: float = 0.0) -> list[Any]:
    """Up to ``limit`` items from the bounded queue, after at most ``timeout`` seconds for the first.

    The first is never taken with ``get_nowait`` (no timeout waits a moment instead): that fails at once
    while the reader holds the queue's lock to drop its oldest frame, which a reader behind a full queue
    does for every frame, so frames that are waiting would look like none. The rest may stay for the
    next call.
    """
    found = []
    try:
        found.append(frames.get(timeout=timeout if timeout > 0 else _LOCK_WAIT_S))
        while len(found) < limit:
            found.append(frames.get_nowait())
    except (queue.Empty, EOFError, OSError):  # EOF: the reader died (perhaps in the middle of a put)
        pass
    return found


def drop_write_end(channel: Any) -> None:
    """Close this process's copy of a queue's write end, once the process that writes it has started (it has
    its own copy). A writer killed in the middle of a put then leaves EOF to read (``EOFError``) rather than
    a read that waits forever for the rest of the message."""
    channel._writer.close()


class FeedReader:
    """One feed's reader process and the pipeline's end of its queue.

        reader = FeedReader("rtsp://cam/stream1", FeedOptions(sample_fps=1))
        reader.start(); reader.wait_connected()
        for frame in reader.frames(timeout=1.0): ...
        reader.close()

    ``sampled`` / ``dropped`` count the frames the sampler kept and those dropped because the pipeline
    fell behind; ``restarts`` the reader processes the parent replaced.
    """

    def __init__(self, url: str, options: FeedOptions = FeedOptions(), name: str | None = None):
        self.url = url
        self.name = name or redact_url(url)
        self.options = options
        self.ended = False
        self.restarts = 0
        self.last_frame_time: float | None = None
        self._context = mp.get_context("spawn")
        self._frames: Any = None  # the queues and stop signal of the current reader process (see start)
        self._events: Any = None
        self._stop: StopSignal | None = None
        self._counters = self._context.Array("q", 2, lock=False)  # written by the reader only
        self._heartbeat = self._context.Value("d", time.time(), lock=False)
        self._process: mp.process.BaseProcess | None = None
        self._connected = False

    @property
    def sampled(self) -> int:
        return int(self._counters[0])

    @property
    def dropped(self) -> int:
        return int(self._counters[1])

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, lost_at: float | None = None) -> "FeedReader":
        check_source(self.url)
        # New channels for every process: one that was killed may have died holding a queue's lock.
        self._frames = self._context.Queue(maxsize=self.options.queue_frames)
        self._events = self._context.Queue()
        self._stop = StopSignal(self._context)
        self._heartbeat.value = time.time() + _START_GRACE_S
        self._process = self._context.Process(
            target=read_feed, name=f"dymu-feed-{self.name}", daemon=True,
            args=(self.url, self.options, self._frames, self._events, self._stop, self._counters,
                  self._heartbeat, lost_at),
        )
        self._process.start()
        for channel in (self._frames, self._events):
            drop_write_end(channel)
        log.info("reader for %s started (pid %d)", self.name, self._process.pid)
        return self

    def wait_connected(self) -> None:
        """Block until the feed has opened; raise ``FeedUnavailable`` (one line) if it cannot be."""
        limit = self.options.connect_timeout_s + _START_GRACE_S
        deadline = time.monotonic() + limit
        while not self._connected and not self.ended:
            try:
                self._handle(*self._events.get(timeout=0.25))
                continue
            except (queue.Empty, EOFError, OSError):
                pass
            if not self._process.is_alive():
                raise FeedUnavailable(f"{self.name}: the reader exited (code {self._process.exitcode})")
            if time.monotonic() > deadline:
                raise FeedUnavailable(f"{self.name}: the reader did not connect within {limit:g} s")

    def frames(self, timeout: float = 0.0) -> list[Frame]:
        """The frames waiting (at most the queue's size), after at most ``timeout`` seconds for the first.

        Also runs the parent's watchdog, so call it regularly.
        """
        self._check_health()
        found = take_waiting(self._frames, self.options.queue_frames, timeout)
        if found:
            self.last_frame_time = found[-1].time
        return found

    def close(self) -> None:
        """Stop the reader and wait for its process to end (killed if it does not within the connect timeout)."""
        process, self._process = self._process, None
        if process is not None:
            self._stop.set()
            process.join(timeout=1.0 + self.options.connect_timeout_s)
            if process.is_alive():
                log.warning("reader for %s did not stop, killing it", self.name)
                process.kill()
                process.join()
            process.close()
            self._close_channels()

    def _close_channels(self) -> None:
        for channel in (self._frames, self._events):
            channel.cancel_join_thread()
            channel.close()

    def __enter__(self) -> "FeedReader":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _handle(self, kind: str, reason: str) -> None:
        if kind == "connected":
            self._connected = True
            log.info("%s: connected", self.name)
        elif kind == "lost":
            log.warning("%s: lost (%s)", self.name, reason)
        elif kind == "ended":
            self.ended = True
            log.info("%s: the file ended", self.name)
        elif kind == "failed":
            raise FeedUnavailable(f"cannot open {self.name}: {reason}")

    def _check_health(self) -> None:
        """Read the reader's events; replace a reader that died or stopped beating."""
        while True:
            try:
                self._handle(*self._events.get_nowait())
            except (queue.Empty, EOFError, OSError):
                break
        if self._process is None or self.ended:
            return
        silent = time.time() - self._heartbeat.value
        hang_limit = self.options.connect_timeout_s + self.options.stall_timeout_s + _HANG_GRACE_S
        if self._process.is_alive() and silent <= hang_limit:
            return
        why = f"silent for {silent:.0f} s" if self._process.is_alive() else f"exit code {self._process.exitcode}"
        log.warning("%s: reader process %d %s, starting a new one", self.name, self._process.pid, why)
        self._process.kill()
        self._process.join()
        self._process.close()
        self._close_channels()
        self.restarts += 1
        self.start(lost_at=self.last_frame_time or time.time())
