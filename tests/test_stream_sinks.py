"""`dymu-video stream`'s result sinks: a Redis stream that goes away and comes back never stops the results."""
from __future__ import annotations

import json
import socket
import subprocess
import time

import redis

from pipeline.commands.stream import ResultSinks, undelivered_lines
from workers.redis_server import connect_redis, find_redis_server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_redis(port: int, workdir) -> subprocess.Popen:
    """A redis-server on a fixed port, so that it can come back where it was."""
    process = subprocess.Popen([str(find_redis_server()), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            connect_redis(f"redis://127.0.0.1:{port}/0", timeout_s=0.5).close()
            return process
        except Exception:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.05)


def _stop_redis(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(timeout=30)


def result(n: int) -> dict:
    return {"feed": "udp://cam", "answer": f"answer {n}", "n": n}


def test_redis_stream_outage_keeps_results_going_and_reconnects(tmp_path):
    port = _free_port()
    server = _start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    out = tmp_path / "results.jsonl"
    sinks = ResultSinks(str(out), connect_redis(url, op_timeout_s=5.0), "cams:answers", 100, retry_s=0.0)
    try:
        assert "undelivered" not in sinks.write(result(1))
        _stop_redis(server)
        missed = sinks.write(result(2))  # Redis is gone: no exception, the result says what it missed
        assert "cams:answers" in missed["undelivered"]["redis_stream"]
        assert "not delivered: Redis stream cams:answers unavailable" in undelivered_lines(missed)
        server = _start_redis(port, tmp_path)
        assert "undelivered" not in sinks.write(result(3))  # the sink reconnected by itself
        # The stream of the Redis that came back (empty: no persistence) has the held result, then the new one.
        assert [json.loads(fields[b"json"])["n"] for _, fields in redis.Redis(port=port).xrange("cams:answers")] \
            == [2, 3]
    finally:
        sinks.close()
        _stop_redis(server)

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["n"] for r in lines] == [1, 2, 3]  # the file has every result, the missed one marked
    assert [("undelivered" in r) for r in lines] == [False, True, False]


def test_a_dead_redis_is_not_retried_on_every_result(tmp_path):
    port = _free_port()
    server = _start_redis(port, tmp_path)
    sinks = ResultSinks(None, connect_redis(f"redis://127.0.0.1:{port}/0"), "k", 100, retry_s=3600.0)
    try:
        _stop_redis(server)
        first = sinks.write(result(1))
        server = _start_redis(port, tmp_path)
        second = sinks.write(result(2))  # Redis is back, but the next try is retry_s after the failure
        assert "undelivered" in first and second["undelivered"] == first["undelivered"]
        assert redis.Redis(port=port).xlen("k") == 0
    finally:
        _stop_redis(server)


def test_results_held_while_redis_is_away_are_added_in_order_at_most_maxlen(tmp_path, caplog):
    port = _free_port()
    server = _start_redis(port, tmp_path)
    sinks = ResultSinks(None, connect_redis(f"redis://127.0.0.1:{port}/0", op_timeout_s=5.0), "k", 3, retry_s=0.0)
    try:
        _stop_redis(server)
        missed = [sinks.write(result(n)) for n in range(1, 6)]  # five results while Redis is away
        assert all("held" in r["undelivered"]["redis_stream"] for r in missed)
        assert sinks.dropped == 2 and "dropping the oldest" in caplog.text  # 1 and 2: more than 3 were waiting
        server = _start_redis(port, tmp_path)
        assert "undelivered" not in sinks.write(result(6))
        stream = [json.loads(fields[b"json"])["n"] for _, fields in redis.Redis(port=port).xrange("k")]
        assert stream == [4, 5, 6] and sinks.dropped == 3  # the newest three, in order, each once
        assert "3 held result(s) written in order; 3 older one(s) dropped" in caplog.text
        assert "undelivered" not in sinks.write(result(7))  # and on as usual
        assert redis.Redis(port=port).xlen("k") == 4
    finally:
        sinks.close()
        _stop_redis(server)


def test_results_still_held_at_the_end_get_a_last_try_and_a_warning(tmp_path, caplog):
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = _start_redis(port, tmp_path)
    sinks = ResultSinks(None, connect_redis(url, op_timeout_s=5.0), "k", 100, retry_s=3600.0)
    try:
        _stop_redis(server)
        sinks.write(result(1))
        server = _start_redis(port, tmp_path)
        sinks.write(result(2))  # within retry_s of the failure: held, not tried
        sinks.close()  # the last try writes both
        assert [json.loads(f[b"json"])["n"] for _, f in redis.Redis(port=port).xrange("k")] == [1, 2]
        assert "never reached Redis" not in caplog.text

        sinks = ResultSinks(None, connect_redis(url, op_timeout_s=5.0), "k", 100)
        _stop_redis(server)
        sinks.write(result(3))
        sinks.close()  # Redis did not come back: said, not silently lost
        assert "1 result(s) never reached Redis" in caplog.text
    finally:
        _stop_redis(server)
