"""Live feeds: readers, the stream runner and `dymu-video stream`, against real MPEG-TS feeds on loopback UDP.

A feed is a subprocess (``tests/live_feed.py``) that encodes a synthetic camera view with PyAV and sends it
as MPEG-TS to ``udp://127.0.0.1:PORT`` in real time. Every wait below is bounded in time.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.commands.stream import parse_duration
from pipeline.ingest import (ArrivalClock, FeedOptions, FeedReader, FeedUnavailable, Sampler, drop_write_end,
                             offer_dropping_oldest, open_options, source_kind, take_waiting)
from pipeline.sample_media import scene_frames, write_video

REPO = Path(__file__).resolve().parents[1]


# --- the live feed -------------------------------------------------------------------------------------
def start_feed(port: int, seconds: float = 60.0) -> subprocess.Popen:
    """A camera sending to udp://127.0.0.1:port (see tests/live_feed.py)."""
    return subprocess.Popen([sys.executable, "-m", "tests.live_feed", str(port), str(seconds)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


@pytest.fixture(autouse=True)
def torch_threads():
    """``open_streams`` sizes torch's thread pool for its readers; the next tests get theirs back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def feed_port():
    """A port with a live feed on it for the test (killed at the end)."""
    port = free_udp_port()
    sender = start_feed(port)
    yield port
    stop(sender)


# --- the command as a user runs it ---------------------------------------------------------------------
def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Command:
    """`dymu-video stream ...` in a subprocess, its stdout read line by line with timeouts."""

    def __init__(self, *args: str):
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        # Its own process group, so that a signal can go to the group, as a terminal's Ctrl-C does. SIGINT at
        # its default, as in a terminal's foreground job: a suite started in the background (`make test &`)
        # inherits SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt.
        self.process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "stream", *args], cwd=REPO, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True, preexec_fn=default_sigint)
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []  # stderr, as it comes
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_log, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def _pump_log(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)

    def wait_for_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.log):
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} on stderr within {timeout} s: {''.join(self.log)[-2000:]}")
            time.sleep(0.05)

    def next_result(self, timeout: float) -> dict:
        try:
            return json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            self.process.kill()
            pytest.fail(f"no result within {timeout} s; stderr: {''.join(self.log)[-2000:]}")

    def descendants(self) -> set[int]:
        """Processes started by the command, found through /proc (children of children included)."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        found, frontier = set(), {self.process.pid}
        while frontier:
            frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
            found |= frontier
        return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def model_args(tiny_ov: Path) -> list[str]:
    return ["--model", str(tiny_ov), "--device", "cpu", "--max-new-tokens", "4"]


def test_stream_command_answers_on_schedule_survives_a_cut_and_stops_on_ctrl_c(tiny_ov):
    port = free_udp_port()
    sender = start_feed(port)
    command = Command(f"udp://127.0.0.1:{port}", "--ask", "What is happening?", "--every", "2s", "--window", "6s",
                      "--sample-fps", "2", "--connect-timeout", "2s", "--stall-timeout", "2s", "--json",
                      *model_args(tiny_ov))
    try:
        before = [command.next_result(timeout=90)]
        before += [command.next_result(timeout=30) for _ in range(4)]
        # Results every 2 s of feed. Never more often: a result is due on a 2 s grid of feed time, once per
        # grid step, so any two results but one are more than 2 s apart. Never later than the step after
        # the newest frames it could see: 2 s plus how far behind the pipeline was (lag_s) and a frame.
        ends = [r["end"] for r in before]
        assert all(c - a > 2.0 for a, c in zip(ends, ends[2:])), ends
        assert all(b["end"] - a["end"] <= 2.0 + b["lag_s"] + 2 * 0.5 for a, b in zip(before, before[1:])), before
        for result in before:
            assert result["answer"] and result["tokens"] > 0 and result["reconnects"] == 0 and not result["gaps"]
            assert result["end"] - result["start"] <= 6.0 and result["frames"] <= 13
            assert result["start"] <= result["end"] <= result["time"]

        stop(sender)  # the camera goes away...
        command.wait_for_log("lost", timeout=60)
        sender = start_feed(port)  # ...and comes back once the reader has noticed
        after = command.next_result(timeout=45)
        while not after["gaps"] and after["reconnects"] == 0:
            after = command.next_result(timeout=30)  # results already on their way before the cut
        assert after["reconnects"] == 1
        gap = after["gaps"][0]
        # From the last frame that came before the cut to the first one after: longer than the 2 s read
        # timeout that noticed it.
        assert gap["seconds"] >= 2.0 and gap["attempts"] >= 1 and gap["reason"]
        assert gap["start"] >= before[-1]["end"] - 0.01 and gap["end"] <= after["end"]
        resumed = [command.next_result(timeout=15) for _ in range(2)]
        assert all(r["end"] > after["end"] and not r["gaps"] for r in resumed)

        children = command.descendants()
        assert children, "the feed reader runs in its own process"
        os.killpg(command.process.pid, signal.SIGINT)  # Ctrl-C: the readers get it too
        # Stopping ends the feed readers and the answer in progress: about 3 s on a loaded machine; the bound
        # only keeps a hang from stalling the suite.
        try:
            code = command.process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # where it hangs: faulthandler prints every thread's stack on SIGABRT
            os.kill(command.process.pid, signal.SIGABRT)
            command.process.wait(timeout=30)
            pytest.fail(f"still running 60 s after Ctrl-C; stderr: {''.join(command.log)[-6000:]}")
        assert code == 0, ''.join(command.log)[-3000:]
        command.wait_for_log("stopped after", timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if alive(pid)]
    finally:
        stop(sender)
        if command.process.poll() is None:
            command.process.kill()
            command.process.wait()


def test_unreachable_feed_is_one_clear_line_after_the_connect_timeout(tiny_ov):
    port = free_udp_port()  # nothing sends there
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "stream", f"udp://127.0.0.1:{port}", "--ask", "?",
                          "--connect-timeout", "1s", *model_args(tiny_ov)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip() == f"dymu-video stream: error: cannot open udp://127.0.0.1:{port}: no data within 1 s"
    assert time.monotonic() - started < 30


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def without_undelivered(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "undelivered"}


def test_results_made_while_redis_was_away_reach_the_stream_in_order_once_it_is_back(tiny_ov, feed_port):
    import redis

    from workers.redis_server import EmbeddedRedis

    server = EmbeddedRedis(maxmemory="64mb", port=free_tcp_port()).start()  # comes back on the same port
    command = Command(f"udp://127.0.0.1:{feed_port}", "--ask", "What is happening?", "--every", "2s", "--window",
                      "4s", "--sample-fps", "2", "--connect-timeout", "5s", "--json", "--redis-url", server.url,
                      "--redis-stream", "cams:answers", *model_args(tiny_ov))
    try:
        results = [command.next_result(timeout=90)]
        assert "undelivered" not in results[0]
        server.stop()
        while sum("undelivered" in r for r in results) < 2:  # two results (at least) while Redis is away
            results.append(command.next_result(timeout=30))
        server.start()  # empty: what was in the stream went with the old server
        while "undelivered" in results[-1]:  # until a result is delivered again
            results.append(command.next_result(timeout=30))
        stream = [json.loads(fields[b"json"]) for _, fields in redis.Redis.from_url(server.url).xrange("cams:answers")]
        missed = next(i for i, r in enumerate(results) if "undelivered" in r)
        # Every result from the first one Redis missed: the outage's, then the one that found Redis back, each
        # once and in the order they were made.
        assert stream == [without_undelivered(r) for r in results[missed:]], (stream, results)
        command.wait_for_log("Redis is back", timeout=10)
    finally:
        if command.process.poll() is None:
            command.process.kill()
            command.process.wait()
        server.stop()


# --- the Python API ------------------------------------------------------------------------------------
def test_two_feeds_share_one_engine_and_answer_on_demand(tiny_ov):
    from pipeline.stream import open_streams

    ports = [free_udp_port(), free_udp_port()]
    senders = [start_feed(port) for port in ports]
    urls = [f"udp://127.0.0.1:{port}" for port in ports]
    try:
        options = FeedOptions(sample_fps=2, connect_timeout_s=10, stall_timeout_s=5)
        with open_streams(urls, "What is there?", every_s=1.5, window_s=4, feed_options=options,
                          model=str(tiny_ov), device="cpu", max_new_tokens=4) as streams:
            assert len({id(feed.reader) for feed in streams.feeds}) == 2
            results: dict[str, list] = {url: [] for url in urls}
            deadline = time.monotonic() + 60
            for result in streams:
                results[result.feed].append(result)
                if all(len(found) >= 2 for found in results.values()) or time.monotonic() > deadline:
                    break
            assert all(len(found) >= 2 for found in results.values()), {k: len(v) for k, v in results.items()}
            for found in results.values():
                assert all(r.end - r.start <= 4.0 and r.tokens > 0 and r.positions >= r.tokens for r in found)
                assert found[1].end > found[0].end
            on_demand = streams.ask("Who is there?")
            assert sorted(r.feed for r in on_demand) == sorted(urls)
            assert all(r.on_demand and r.question == "Who is there?" and r.answer for r in on_demand)
            pids = [feed.reader.pid for feed in streams.feeds]
        assert not any(alive(pid) for pid in pids)
    finally:
        for sender in senders:
            stop(sender)


def test_static_view_adds_far_fewer_tokens_per_second_than_a_busy_one(tiny_ov):
    from dymu.config import make_config
    from pipeline.stream import FeedMemory
    from pipeline.stream_engine import LocalEngine
    from tests.media import textured_frame

    engine = LocalEngine.from_config(make_config(model=str(tiny_ov), device="cpu"))
    rng = np.random.default_rng(0)
    view = textured_frame(128, seed=1).astype(np.float32)
    static = [np.clip(view + rng.normal(0, 1.5, view.shape), 0, 255).astype(np.uint8) for _ in range(8)]
    busy = [textured_frame(128, seed=100 + i) for i in range(8)]
    added = {}
    for name, images in (("static", static), ("busy", busy)):
        memory = FeedMemory(window_s=60, threshold=engine.config.temporal_threshold)
        memory.add(engine.encode_frames(images, [float(t) for t in range(len(images))]))
        first = memory.state.frames[0].new_rows
        added[name] = (memory.rows_added - first) / (len(images) - 1)  # rows per second after the first frame
    assert added["busy"] > 5 * max(added["static"], 1.0), added


def test_ray_engine_encodes_and_answers_like_the_local_one(tiny_ov, ray_local):
    import torch

    from dymu.config import make_config
    from pipeline.stream import FeedMemory
    from pipeline.stream_engine import LocalEngine, RayEngine
    from tests.media import textured_frame

    config = make_config(model=str(tiny_ov), device="cpu", max_new_tokens=4)
    local = LocalEngine.from_config(config)
    images, times = [textured_frame(96, seed=i) for i in range(3)], [0.0, 0.5, 1.0]
    expected = local.encode_frames(images, times)  # (calibrates the thresholds the actor then finds cached)
    engine = RayEngine(config)
    try:
        encoded = engine.encode_frames(images, times)
        for got, want in zip(encoded, expected):
            assert torch.equal(got.mapping, want.mapping) and torch.allclose(got.embeds, want.embeds)
            assert got.timestamps == want.timestamps
        assert torch.equal(engine.newline(), local.newline())
        assert engine.cache_settings() == local.cache_settings()
        memory = FeedMemory(window_s=60, threshold=config.temporal_threshold)
        memory.add(encoded)
        window = memory.window(engine.newline())
        assert engine.answer(window, "What is there?").text == local.answer(window, "What is there?").text
    finally:
        engine.close()


# --- the reader ----------------------------------------------------------------------------------------
def test_a_slow_pipeline_drops_the_oldest_frames(tmp_path):
    clip = write_video(tmp_path / "clip.mp4", scene_frames(num_frames=80, size=64), fps=20)
    with FeedReader(str(clip), FeedOptions(sample_fps=20, queue_frames=3, realtime=True)) as reader:
        reader.wait_connected()
        first = []
        wait_for(lambda: first, 60, lambda: first.extend(reader.frames(timeout=0.5)))
        sampled_then = reader.sampled  # frame first[-1] and those before it, perhaps one more
        # Then the pipeline is busy: frames pile up in the reader's queue until 20 have been dropped.
        wait_for(lambda: reader.dropped >= 20, 60, lambda: time.sleep(0.05))
        sampled = reader.sampled
        waiting = reader.frames()
        assert 1 <= len(waiting) <= 3
        # Clip frames are 1/20 s apart on the reader's clock: the ones waiting are the newest sampled...
        since_first = round((waiting[-1].time - first[-1].time) * 20)
        assert since_first >= sampled - sampled_then - 2, (since_first, sampled, sampled_then)
        assert reader.sampled >= reader.dropped + len(first) + len(waiting)  # ...the oldest dropped, and counted
        deadline = time.monotonic() + 20
        while not reader.ended and time.monotonic() < deadline:
            reader.frames(timeout=0.2)
        assert reader.ended and reader.sampled <= 80


def offer_until_stopped(frames, stop) -> None:
    """A reader far ahead of its pipeline: the queue stays full and every offer drops the oldest."""
    count = 0
    while not stop.value:
        count += 1
        offer_dropping_oldest(frames, count)


def test_frames_waiting_behind_a_reader_that_is_dropping_are_still_taken():
    context = multiprocessing.get_context("spawn")
    frames, stop = context.Queue(maxsize=3), context.Value("b", 0)
    reader = context.Process(target=offer_until_stopped, args=(frames, stop), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while frames.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        taken = [take_waiting(frames, limit=3) for _ in range(100)]
        # The queue is never empty: get_nowait came back with nothing 100 times in 100 here; waiting a
        # moment for the lock, none (a few are allowed for a machine so loaded the reader stalls with it).
        assert sum(not found for found in taken) <= 5
        taken = [found for found in taken if found]
        assert all(len(found) <= 3 for found in taken)
        assert all(later[0] > earlier[-1] for earlier, later in zip(taken, taken[1:]))  # in order, newer each time
    finally:
        stop.value = 1
        reader.join(timeout=10)


def put_half_a_frame(frames) -> None:
    """A reader killed in the middle of a put: the message's length, then only part of the message."""
    os.write(frames._writer.fileno(), (1000).to_bytes(4, "big", signed=True) + b"x" * 10)
    os._exit(1)


def test_a_reader_killed_in_the_middle_of_a_put_never_blocks_the_pipeline():
    context = multiprocessing.get_context("spawn")
    frames = context.Queue(maxsize=3)
    writer = context.Process(target=put_half_a_frame, args=(frames,), daemon=True)
    writer.start()
    drop_write_end(frames)
    writer.join(timeout=60)
    taken: list = []
    taker = threading.Thread(target=lambda: taken.append(take_waiting(frames, limit=3, timeout=1.0)), daemon=True)
    taker.start()
    taker.join(timeout=60)  # a read waiting for the other 990 bytes would never end
    assert not taker.is_alive() and taken == [[]]


def test_a_hung_reader_process_is_replaced_and_the_gap_reported(feed_port, monkeypatch):
    monkeypatch.setattr("pipeline.ingest._HANG_GRACE_S", 0.0)  # restart after connect + stall timeouts (2 s)
    options = FeedOptions(sample_fps=4, connect_timeout_s=1, stall_timeout_s=1)
    with FeedReader(f"udp://127.0.0.1:{feed_port}", options) as reader:
        reader.wait_connected()
        deadline = time.monotonic() + 20
        while reader.last_frame_time is None and time.monotonic() < deadline:
            reader.frames(timeout=0.5)
        hung = reader.pid
        os.kill(hung, signal.SIGSTOP)  # as if stuck in a native read past every timeout
        gaps = []
        deadline = time.monotonic() + 30
        while not gaps and time.monotonic() < deadline:
            gaps = [frame.gap for frame in reader.frames(timeout=0.5) if frame.gap is not None]
        assert reader.restarts == 1 and reader.pid != hung and not alive(hung)
        assert gaps and gaps[0].seconds >= 2.0 and "restarted" in gaps[0].reason


def test_a_reader_never_outlives_its_program(feed_port):
    """Killed with SIGKILL, the program cannot stop its readers: they notice and stop themselves."""
    program = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.ingest import FeedReader; "
         "reader = FeedReader(sys.argv[1]).start(); print(reader.pid, flush=True); time.sleep(120)",
         f"udp://127.0.0.1:{feed_port}"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        reader = int(program.stdout.readline())
        program.kill()  # whatever the reader is doing (starting, connecting, reading)
        program.wait(timeout=10)
        deadline = time.monotonic() + 15
        while alive(reader) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(reader)
    finally:
        stop(program)


def wait_for(condition, timeout_s: float, poll) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        poll()


def test_an_outage_is_reported_from_the_moment_the_feed_was_cut(caplog):
    port = free_udp_port()
    sender = start_feed(port)
    options = FeedOptions(sample_fps=10, connect_timeout_s=3, stall_timeout_s=3)
    frames: list = []
    try:
        with caplog.at_level("WARNING", logger="pipeline.ingest"), \
                FeedReader(f"udp://127.0.0.1:{port}", options) as reader:
            reader.wait_connected()
            wait_for(lambda: len(frames) >= 10, 60, lambda: frames.extend(reader.frames(timeout=0.5)))
            stop(sender)
            cut = time.time()
            # The demuxer hands the cut's last frames over when its read times out, 3 s later.
            wait_for(lambda: "lost" in caplog.text, 60, lambda: frames.extend(reader.frames(timeout=0.5)))
            back = time.time()
            sender = start_feed(port)
            wait_for(lambda: any(f.gap for f in frames), 60, lambda: frames.extend(reader.frames(timeout=0.5)))
    finally:
        stop(sender)
    gap = next(f.gap for f in frames if f.gap)
    assert cut - 1.0 <= gap.start <= cut + 0.5  # from the last frame that came before the cut, as it came
    assert gap.end >= back and gap.seconds >= back - cut - 0.5  # the whole cut, not the part after the timeout
    assert all(a.time < b.time for a, b in zip(frames, frames[1:]))


def test_arrival_clock_stamps_frames_when_they_came_not_when_they_were_decoded():
    clock = ArrivalClock(max_lag_s=10.0)
    # 10 fps with up to 80 ms of jitter on top of a 20 ms delay; then a cut at media time 5 s, whose last
    # frames (4.8 s, 4.9 s) come out of the decoder only when the read times out, 3 s later.
    jitter = np.random.default_rng(0).uniform(0, 0.08, 50)
    stamps = [clock.stamp(i / 10, 1000.02 + i / 10 + jitter[i]) for i in range(48)]
    assert all(1000.0 <= t - i / 10 <= 1000.11 for i, t in enumerate(stamps))
    assert clock.stamp(4.8, 1008.0) == pytest.approx(1004.82, abs=0.1)
    assert clock.stamp(4.9, 1008.0) == pytest.approx(1004.92, abs=0.1)
    assert clock.stamp(0.0, 1009.0) == 1009.0  # the media clock went back (a camera restart): start over
    assert clock.stamp(0.1, 1009.1) == pytest.approx(1009.1)
    assert clock.stamp(None, 1010.0) == 1010.0


def test_closing_after_a_reader_was_killed_or_signalled_does_not_hang(feed_port):
    options = FeedOptions(sample_fps=2, connect_timeout_s=2, stall_timeout_s=2)
    with FeedReader(f"udp://127.0.0.1:{feed_port}", options) as reader:
        reader.wait_connected()
        sampled = reader.sampled
        os.kill(reader.pid, signal.SIGTERM)  # a SIGTERM to the process group: the parent decides, not the reader
        wait_for(lambda: reader.sampled >= sampled + 2, 60, lambda: time.sleep(0.05))  # it reads on
        assert alive(reader.pid)
        killed = reader.pid
        os.kill(killed, signal.SIGKILL)  # killed in the middle of whatever it was doing
        deadline = time.monotonic() + 10
        while reader.restarts == 0 and time.monotonic() < deadline:
            reader.frames(timeout=0.2)  # the watchdog sees it died and starts another
        assert reader.restarts == 1 and reader.pid != killed
        started = time.monotonic()
    # close() waits 1 s plus the connect timeout for a reader before it kills it: never much more.
    assert time.monotonic() - started < 2 * (1.0 + options.connect_timeout_s)


def test_sampler_keeps_a_steady_rate_and_restarts_after_a_pause():
    sampler = Sampler(fps=2)
    times = [i / 30 for i in range(90)]  # 3 s of a 30 fps feed
    kept = [t for t in times if sampler.take(t)]
    assert len(kept) == 6 and np.allclose(np.diff(kept), 0.5, atol=1 / 30)
    assert sampler.take(10.0) and not sampler.take(10.2) and sampler.take(10.5)


def test_open_options_per_protocol():
    rtsp = open_options("rtsp://user:pw@cam/stream1", 5)
    assert rtsp["rtsp_transport"] == "tcp" and rtsp["timeout"] == "5000000" and rtsp["rw_timeout"] == "5000000"
    assert open_options("udp://127.0.0.1:5000", 2)["timeout"] == "2000000"
    assert "timeout" not in open_options("rtmp://host/live", 5)  # rtmp's "timeout" means listen
    assert int(open_options("http://host/feed.ts", 5)["analyzeduration"]) <= 1_000_000
    assert [source_kind(u) for u in ("/dev/video0", "clip.mp4", "file:///x.mp4", "rtsp://cam/s")] == \
        ["device", "file", "file", "network"]
    with pytest.raises(FeedUnavailable, match="no such file"):
        FeedReader("/no/such/clip.mp4").start()


def test_durations():
    assert [parse_duration(text) for text in ("10s", "2m", "500ms", "1h", "3", "1.5s")] == \
        [10.0, 120.0, 0.5, 3600.0, 3.0, 1.5]
    for bad in ("0s", "-1s", "10x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)

