"""`dymu-video stream URL... --every 10s --prompt "..."`: follow live feeds and answer about their recent past."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from typing import Any

from pipeline.commands.ask import add_answer_options, add_model_options, config_overrides

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """'10s', '2m', '500ms', '1h' or a plain number of seconds -> seconds (> 0)."""
    match = _DURATION.match(text)
    seconds = float(match.group(1)) * _SECONDS_PER_UNIT[match.group(2) or "s"] if match else 0.0
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 10s, 2m or 500ms")
    return seconds


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stream",
        help="follow live camera feeds and answer a prompt about their recent past",
        description=(
            "Follow one or more live feeds (rtsp, http(s), udp, rtmp, a /dev/video* camera, or a file with "
            "--realtime). Each sampled frame is merged into the feed's token memory (a static scene adds almost "
            "nothing); every --every seconds the model answers the prompt over the last --window of the feed. "
            "A feed that stalls or drops is reconnected and the gap is reported with the next result; when the "
            "model falls behind, the oldest frames are dropped and the results say so. Ctrl-C stops cleanly."
        ),
        epilog=(
            "examples:\n"
            "  dymu-video stream rtsp://camera.local/stream1 --every 10s --prompt \"Describe what changed.\" --window 60s\n"
            "  dymu-video stream udp://127.0.0.1:5000 --ask \"Is anyone at the door?\" --every 5s --json\n"
            "  dymu-video stream rtsp://cam1/s rtsp://cam2/s --ask \"Any vehicle?\" --redis-url redis://:pw@host:6379/0 \\\n"
            "      --redis-stream cams:answers\n"
            "  dymu-video stream clip.mp4 --realtime --every 5s --prompt \"What happens?\" --model ./tiny\n"
            "\n"
            "Durations take ms, s, m or h (500ms, 10s, 2m). --max-frames caps the frames in the window; --frames\n"
            "and --fps do not apply to feeds (use --sample-fps)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url", nargs="+", help="feed(s): rtsp://, http(s)://, udp://, rtmp://, /dev/videoN or a file")
    question = p.add_mutually_exclusive_group(required=True)
    question.add_argument("--prompt", help="what to answer about each window, e.g. \"Describe what changed.\"")
    question.add_argument("--ask", dest="prompt", help="the same, phrased as a question")
    g = p.add_argument_group("feeds and memory")
    g.add_argument("--every", type=parse_duration, default=10.0, metavar="DURATION",
                   help="answer every this much feed time (default 10s)")
    g.add_argument("--window", type=parse_duration, default=60.0, metavar="DURATION",
                   help="answer about this much of the recent past (default 60s)")
    g.add_argument("--token-budget", type=int, metavar="N",
                   help="at most N visual tokens in a feed's memory; the oldest frames go first")
    g.add_argument("--sample-fps", type=float, default=1.0, metavar="FPS", help="frames kept per second (default 1)")
    g.add_argument("--realtime", action="store_true", help="play a file at its own rate, as if it were live")
    g.add_argument("--connect-timeout", type=parse_duration, default=5.0, metavar="DURATION",
                   help="give up opening a feed after this long (default 5s)")
    g.add_argument("--stall-timeout", type=parse_duration, default=10.0, metavar="DURATION",
                   help="reconnect when no frame came for this long (default 10s)")
    g.add_argument("--max-results", type=int, metavar="N", help="stop after N results (default: run until Ctrl-C)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object per result instead of text")
    out.add_argument("--out", metavar="FILE", help="also append every result to FILE as a JSON line")
    out.add_argument("--redis-url", metavar="URL",
                     help="Redis for the feeds' token chunks and --redis-stream (default $REDIS_URL; none: no Redis)")
    out.add_argument("--redis-stream", metavar="KEY",
                     help="also XADD every result to this Redis stream; results made while Redis is away are held "
                          "(at most --redis-maxlen, the oldest dropped first) and added in order once it is back")
    out.add_argument("--redis-maxlen", type=int, default=10000, metavar="N",
                     help="keep about this many entries in the Redis stream (default 10000)")
    g = p.add_argument_group("where the model runs")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="run the encoder and LLM as actors on this Ray cluster (host:6379, ray://host:10001, or "
                        "'local' for a Ray started for this run); default $DYMU_RAY_ADDRESS or $RAY_ADDRESS, "
                        "else in this process")
    from pipeline.runtime import add_ray_connect_timeout

    add_ray_connect_timeout(g)
    add_model_options(p)
    add_answer_options(p)
    p.set_defaults(func=run)


class ResultSinks:
    """Where results go besides stdout: a JSON-lines file and a Redis stream (capped with MAXLEN).

    The Redis stream is a sink, not a dependency: while Redis is away the results still go to stdout and the
    file, each saying it was not delivered yet (``"undelivered"``), and they are held, at most ``maxlen`` of
    them (the oldest dropped first: the stream's MAXLEN would trim them anyway), to be written to the stream in
    order once Redis answers again (tried with the next result, at most every ``retry_s``, so a dead server
    does not slow the results down). A consumer of the stream thus sees every result in order, unless the
    outage outlasted ``maxlen`` results (``dropped`` counts those, and the log says so).
    """

    def __init__(self, out: str | None, redis_client: Any, stream_key: str | None, maxlen: int,
                 retry_s: float = 5.0):
        self.file = open(out, "a", encoding="utf-8") if out else None
        self.redis = redis_client
        self.stream_key = stream_key
        self.maxlen = maxlen
        self.retry_s = retry_s
        self.dropped = 0  # held results dropped, oldest first, when more than maxlen were waiting
        self._held: deque[dict[str, str]] = deque()  # stream entries not written yet, oldest first
        self._redis_down: str | None = None  # why the last write failed; None while Redis answers
        self._retry_at = 0.0

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Deliver ``record``; returns it, with ``"undelivered"`` (sink -> why) when a sink missed it."""
        if self.stream_key is not None:
            self._hold(record)
            self._flush()
            if self._held:  # this record is the newest held one
                record = {**record, "undelivered": {"redis_stream": self._redis_down}}
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")  # one write per line: a crash never leaves half a line
            self.file.flush()
        return record

    def _hold(self, record: dict[str, Any]) -> None:
        self._held.append({"feed": record["feed"], "answer": record["answer"], "json": json.dumps(record)})
        if len(self._held) > self.maxlen:
            self._held.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("Redis stream %s: more than --redis-maxlen %d results waiting for Redis, dropping the "
                            "oldest (%d dropped so far)", self.stream_key, self.maxlen, self.dropped)

    def _flush(self) -> None:
        """Write the held entries to the stream, oldest first, until they are all there or Redis fails."""
        import redis

        if self._redis_down is not None and time.monotonic() < self._retry_at:
            return
        was_down, written = self._redis_down is not None, 0
        try:
            while self._held:
                self.redis.xadd(self.stream_key, self._held[0], maxlen=self.maxlen, approximate=True)
                self._held.popleft()  # only once Redis took it: a failed XADD is tried again, not lost
                written += 1
        except redis.RedisError as exc:
            if self._redis_down is None:
                log.warning("Redis stream %s: cannot write (%s); results go on to stdout%s, marked undelivered, and "
                            "are held (at most --redis-maxlen %d) until Redis is back", self.stream_key, exc,
                            " and --out" if self.file else "", self.maxlen)
            self._redis_down = (f"Redis stream {self.stream_key} unavailable: {' '.join(str(exc).split())} "
                                "(held, written in order once Redis is back)")
            self._retry_at = time.monotonic() + self.retry_s
            return
        if was_down:
            dropped = f"; {self.dropped} older one(s) dropped so far (over --redis-maxlen)" if self.dropped else ""
            log.warning("Redis stream %s: Redis is back, %d held result(s) written in order%s",
                        self.stream_key, written, dropped)
            self._redis_down = None

    def close(self) -> None:
        """Close the file; a last try to write what is held, and a warning naming what never reached Redis."""
        if self.stream_key is not None and self._held:
            self._retry_at = 0.0
            self._flush()
            if self._held:
                log.warning("Redis stream %s: %d result(s) never reached Redis (it did not come back before the end)",
                            self.stream_key, len(self._held))
        if self.file is not None:
            self.file.close()


def undelivered_lines(record: dict[str, Any]) -> str:
    """What a text result adds when a sink missed it."""
    return "".join(f"\n  not delivered: {why}" for why in record.get("undelivered", {}).values())


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def load_engine(config: Any, ray_address: str | None, feeds: int, ray_connect_timeout_s: float = 30.0
                ) -> tuple[Any, bool]:
    """(engine, whether this call connected to Ray): Ray actors when there is an address, else this process."""
    from pipeline.stream_engine import LocalEngine, RayEngine

    ray_address = ray_address or os.environ.get("DYMU_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not ray_address:
        return LocalEngine.from_config(config, feeds), False
    from pipeline.runtime import connect_ray

    connected = connect_ray(ray_address, ray_connect_timeout_s)
    return RayEngine(config), connected


def model_type(model: str, revision: str | None) -> str:
    """The checkpoint's model_type, from its config alone (a checkpoint that is not there fails here)."""
    from transformers import AutoConfig

    from dymu.families.base import load_pretrained

    return load_pretrained(AutoConfig, model, revision).model_type


def run(args: argparse.Namespace) -> int:
    from dymu.errors import DymuError
    from dymu.config import make_config
    from pipeline.ingest import FeedOptions
    from pipeline.validate import check_args, check_config, check_text, check_writable, is_local_run
    from workers.redis_server import connect_redis

    # SIGTERM stops like Ctrl-C: the same `finally` closes the readers and joins their processes.
    signal.signal(signal.SIGTERM, _interrupt)
    check_text(args.prompt, "prompt")
    check_args(args)
    if args.out:
        check_writable(args.out)
    config = make_config(args.preset, args.config_file, **config_overrides(args))
    check_config(config, local=is_local_run(args.ray_address))
    model_type(config.model, config.revision)  # a checkpoint that is not there fails before any feed is opened
    from pipeline.stream import LiveStreams, connect_feeds  # these import torch: after the checks that need none
    from workers.token_cache import TokenCache

    options = FeedOptions(sample_fps=args.sample_fps, connect_timeout_s=args.connect_timeout,
                          stall_timeout_s=args.stall_timeout, realtime=args.realtime)
    redis_url = args.redis_url or os.environ.get("REDIS_URL") or None
    if args.redis_stream and not redis_url:
        raise DymuError("--redis-stream needs a Redis: pass --redis-url or set REDIS_URL")
    # Redis is checked before any feed is opened, so that a typo fails at once.
    cache = TokenCache(redis_url) if redis_url else None
    stream_client = connect_redis(redis_url, op_timeout_s=5.0) if args.redis_stream else None
    sinks = ResultSinks(args.out, stream_client, args.redis_stream, args.redis_maxlen)
    streams, engine, ray_connected, count = None, None, False, 0
    try:
        readers = connect_feeds(args.url, options)
        try:
            engine, ray_connected = load_engine(config, args.ray_address, len(readers), args.ray_connect_timeout)
        except BaseException:
            for reader in readers:
                reader.close()
            raise
        streams = LiveStreams(readers, engine, args.prompt, args.every, args.window, args.token_budget, cache)
        for result in streams:
            record = sinks.write(result.to_json())
            print(json.dumps(record) if args.json else result.to_text() + undelivered_lines(record), flush=True)
            count += 1
            if args.max_results is not None and count >= args.max_results:
                break
    except KeyboardInterrupt:
        print(f"dymu-video stream: stopped after {count} result(s)", file=sys.stderr)
    finally:
        if streams is not None:
            streams.close()
        if engine is not None:
            engine.close()
        if ray_connected:
            import ray

            ray.shutdown()
        sinks.close()
        if cache is not None:
            cache.close()
    return 0
