"""The Redis token cache against a real redis-server: exact round trips, keys, TTLs, bad values as
misses, and a clear ``CacheUnavailable`` when the server is absent or goes away."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis
import torch
from safetensors.torch import save as st_save

from dymu.errors import DymuError
from dymu.tokens import MergedTokens
from workers.redis_server import (
    CacheUnavailable,
    EmbeddedRedis,
    _running,
    _serves_from,
    clean_stale_workdirs,
    connect_redis,
    find_redis_server,
)
from workers.token_cache import (
    KEY_PREFIX,
    TokenCache,
    _Manifest,
    content_hash,
    live_source_id,
    token_cache_key,
)


def make_tokens(dtype: torch.dtype = torch.float32, frames: int = 3, patches: int = 8, dim: int = 16,
                seed: int = 0) -> MergedTokens:
    """Tokens where some rows span frames, as temporal merging makes them."""
    generator = torch.Generator().manual_seed(seed)
    positions = frames * patches
    # Rows 0..patches-1 stand for frame 0's patches; every later position reuses one of them or a new row.
    mapping = torch.arange(positions) % patches
    fresh = torch.rand(positions, generator=generator) < 0.4
    fresh[:patches] = True
    mapping[fresh] = torch.arange(int(fresh.sum()))
    mapping[~fresh] = mapping[~fresh] % patches
    rows = int(mapping.max()) + 1
    return MergedTokens(
        embeds=torch.randn(rows, dim, generator=generator).to(dtype),
        sizes=torch.bincount(mapping, minlength=rows),
        mapping=mapping,
        positions_per_frame=[patches] * frames,
        timestamps=[0.5 * f for f in range(frames)],
        config_hash="cfg-123",
        meta={"model_id": "tiny", "preset": "medium"},
    )


def assert_identical(a: MergedTokens, b: MergedTokens) -> None:
    assert a.embeds.dtype == b.embeds.dtype
    assert a.embeds.shape == b.embeds.shape
    # Compare bit patterns: NaN-safe and exact, whatever the dtype.
    assert a.embeds.contiguous().view(torch.uint8).equal(b.embeds.contiguous().view(torch.uint8))
    assert torch.equal(a.sizes, b.sizes) and torch.equal(a.mapping, b.mapping)
    assert (a.positions_per_frame, a.timestamps, a.config_hash, a.meta) == (
        b.positions_per_frame, b.timestamps, b.config_hash, b.meta)


@pytest.fixture
def cache(redis_server) -> Iterator[TokenCache]:  # noqa: F811
    token_cache = TokenCache(redis_server.url, ttl_s=600)
    yield token_cache
    token_cache.close()


@pytest.fixture
def client(redis_server) -> Iterator[redis.Redis]:  # noqa: F811
    redis_client = connect_redis(redis_server.url)
    yield redis_client
    redis_client.close()


def fresh_key(request) -> str:
    """A key of its own for each test (no glob characters, so that SCAN patterns built on it are exact)."""
    return token_cache_key(hashlib.sha256(request.node.nodeid.encode()).hexdigest(), "tiny/model", "main", {})


def part_keys(client: redis.Redis, key: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{key}:part:*"))


def store_raw(cache: TokenCache, key: str, data: bytes) -> None:
    """Write bytes in the cache's own layout, with a valid manifest, as a foreign writer could."""
    view = memoryview(data)
    parts = [view[i : i + cache.part_bytes] for i in range(0, len(data), cache.part_bytes)]
    manifest = _Manifest(len(parts), len(data), hashlib.sha256(data).hexdigest())
    for part_key, part in zip(manifest.part_keys(key), parts):
        cache._client.set(part_key, part)
    cache._client.set(key, manifest.to_json())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_identical(cache, request, dtype):
    tokens = make_tokens(dtype)
    key = fresh_key(request)
    written = cache.put(key, tokens)
    assert written == len(tokens.to_bytes())
    assert cache.exists(key)
    assert_identical(cache.get(key), tokens)
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.bytes_written, stats.bytes_read) == (1, 0, written, written)


def test_absent_key_is_a_miss(cache, request):
    assert cache.get(fresh_key(request)) is None
    assert not cache.exists(fresh_key(request))
    assert cache.stats().misses == 1


def test_large_value_is_split_into_parts_and_round_trips(redis_server, client, request):  # noqa: F811
    tokens = make_tokens(torch.bfloat16, frames=16, patches=32, dim=64)
    small_parts = TokenCache(redis_server.url, ttl_s=600, part_bytes=1000)
    key = fresh_key(request)
    size = small_parts.put(key, tokens)
    expected_parts = -(-size // 1000)
    assert expected_parts > 3
    assert json.loads(client.get(key))["parts"] == expected_parts
    assert len(part_keys(client, key)) == expected_parts
    assert_identical(small_parts.get(key), tokens)
    # A reader with another part size reads the writer's layout from the manifest.
    assert_identical(TokenCache(redis_server.url).get(key), tokens)
    assert small_parts.delete(key)
    assert part_keys(client, key) == [] and not client.exists(key)
    assert not small_parts.delete(key)


def test_every_key_of_an_entry_gets_the_ttl(redis_server, client, request):  # noqa: F811
    cache = TokenCache(redis_server.url, ttl_s=300, part_bytes=500)
    key = fresh_key(request)
    cache.put(key, make_tokens())
    keys = [key, *part_keys(client, key)]
    assert len(keys) > 2
    for k in keys:
        assert 290 < client.ttl(k) <= 300
    cache.put(key, make_tokens(seed=1), ttl_s=20)
    new_keys = [key, *part_keys(client, key)]
    for k in new_keys:
        assert 0 < client.ttl(k) <= 20


def test_expired_part_is_a_miss(redis_server, client, request):  # noqa: F811
    cache = TokenCache(redis_server.url, part_bytes=500)
    key = fresh_key(request)
    cache.put(key, make_tokens())
    expiring = part_keys(client, key)[1]
    client.pexpire(expiring, 1)
    assert _wait_until(lambda: not client.exists(expiring))
    assert cache.get(key) is None
    assert cache.stats().misses == 1 and cache.stats().corrupt == 0
    cache.put(key, make_tokens(seed=1))  # a rewrite repairs the entry
    assert_identical(cache.get(key), make_tokens(seed=1))


def _other_schema_bytes() -> bytes:
    tokens = make_tokens()
    header = {"schema": "999", "positions_per_frame": json.dumps(tokens.positions_per_frame),
              "timestamps": json.dumps(tokens.timestamps), "config_hash": "", "meta": "{}"}
    return st_save({"embeds": tokens.embeds, "sizes": tokens.sizes, "mapping": tokens.mapping}, metadata=header)


@pytest.mark.parametrize("damage", [
    "junk_part", "truncated_part", "raw_value", "hash_value", "bad_manifest", "huge_part_count",
    "not_safetensors", "other_schema", "broken_shapes",
])
def test_corrupt_or_foreign_value_is_a_miss_and_is_deleted(redis_server, client, request, caplog, damage):  # noqa: F811
    cache = TokenCache(redis_server.url, part_bytes=300)
    key = fresh_key(request)
    cache.put(key, make_tokens())
    parts = part_keys(client, key)
    if damage == "junk_part":
        client.set(parts[1], os.urandom(300))
    elif damage == "truncated_part":
        client.set(parts[0], client.get(parts[0])[:-1])
    elif damage == "raw_value":
        client.set(key, b"\xff\x00 hello")
    elif damage == "hash_value":
        client.delete(key)
        client.hset(key, "field", "value")
    elif damage == "bad_manifest":
        client.set(key, json.dumps({"parts": "many"}))
    elif damage == "huge_part_count":
        client.set(key, json.dumps({"parts": 10**12, "bytes": 1, "sha256": ""}))
    elif damage == "not_safetensors":
        store_raw(cache, key, b"definitely not safetensors")
    elif damage == "other_schema":
        store_raw(cache, key, _other_schema_bytes())
    elif damage == "broken_shapes":
        bad = make_tokens()
        bad.sizes = bad.sizes[:-1]
        store_raw(cache, key, bad.to_bytes())

    with caplog.at_level(logging.WARNING, logger="workers.token_cache"):
        assert cache.get(key) is None
    assert "dropping invalid value" in caplog.text
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.corrupt) == (0, 1, 1)
    assert not client.exists(key)
    if damage in ("junk_part", "truncated_part"):
        assert part_keys(client, key) == []
    # The slot is usable again.
    cache.put(key, make_tokens(seed=1))
    assert_identical(cache.get(key), make_tokens(seed=1))


def test_reader_never_sees_a_mix_of_two_writes(redis_server, request):  # noqa: F811
    # Two encodes of the same video need not be bit-identical (GPU kernels), and safetensors' header order
    # varies, so an entry may be rewritten with other bytes while another worker reads it.
    key = fresh_key(request)
    values = [make_tokens(frames=4, seed=1), make_tokens(frames=4, dim=24, seed=2)]
    writer = TokenCache(redis_server.url, part_bytes=256)
    reader = TokenCache(redis_server.url, part_bytes=256)
    writer.put(key, values[0])
    stop = threading.Event()

    writes = [0]

    def rewrite() -> None:
        while not stop.is_set():
            for value in values:
                writer.put(key, value)
                writes[0] += 1

    thread = threading.Thread(target=rewrite)
    thread.start()
    try:
        # Read until both sides have done enough work side by side, however slow the machine is.
        deadline = time.monotonic() + 120  # only against a hang
        while reader.stats().hits < 20 or writes[0] < 40:
            assert time.monotonic() < deadline and thread.is_alive()
            got = reader.get(key)  # a miss is allowed (the parts were replaced between two reads)
            if got is not None:
                assert_identical(got, values[0] if got.embeds.shape == values[0].embeds.shape else values[1])
    finally:
        stop.set()
        thread.join()
    assert reader.stats().corrupt == 0


def test_key_depends_on_everything_that_changes_the_tokens():
    settings = {"frames": 16, "preset": "medium", "thresholds": [0.9, 0.8], "resolution": 384}
    key = token_cache_key("abc", "llava-hf/ov", "rev1", settings)
    assert key.startswith(KEY_PREFIX + "abc:")
    reordered = dict(reversed(list(settings.items())))
    assert token_cache_key("abc", "llava-hf/ov", "rev1", reordered) == key
    assert token_cache_key("abc", "llava-hf/ov", "rev1", {**settings, "frames": 32}) != key
    assert token_cache_key("abc", "llava-hf/ov", "rev1", {**settings, "thresholds": [0.9, 0.7]}) != key
    assert token_cache_key("abc", "llava-hf/ov", "rev2", settings) != key
    assert token_cache_key("abc", "llava-hf/other", "rev1", settings) != key
    assert token_cache_key("abd", "llava-hf/ov", "rev1", settings) != key
    nested = {"a": {"y": 1, "x": 2}}
    assert token_cache_key("s", "m", "r", nested) == token_cache_key("s", "m", "r", {"a": {"x": 2, "y": 1}})


def test_content_hash_is_of_the_bytes_not_the_name(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    first, second, other = tmp_path / "a.mp4", tmp_path / "b.mkv", tmp_path / "c.mp4"
    first.write_bytes(data)
    second.write_bytes(data)
    other.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert content_hash(first) == content_hash(second) == hashlib.sha256(data).hexdigest()
    assert content_hash(other) != content_hash(first)
    with pytest.raises(DymuError, match="cannot read"):
        content_hash(tmp_path / "missing.mp4")


def test_live_source_id_buckets_time():
    assert live_source_id("rtsp://cam/1", 0.0, 10) == live_source_id("rtsp://cam/1", 9.99, 10)
    assert live_source_id("rtsp://cam/1", 10.0, 10) != live_source_id("rtsp://cam/1", 9.99, 10)
    assert live_source_id("rtsp://cam/1", 5.0, 10) != live_source_id("rtsp://cam/2", 5.0, 10)
    assert ":" not in live_source_id("rtsp://cam/1", 5.0, 10)


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What "fails fast" means: well before one command's timeout, i.e. no waiting on a dead socket and no
# retries with backoff (a bound from the client's own settings, not from this machine's speed).
OP_TIMEOUT_S = 30.0


def test_unreachable_redis_fails_fast_with_the_url():
    url = f"redis://127.0.0.1:{_unused_port()}/0"
    start = time.monotonic()
    with pytest.raises(CacheUnavailable, match=f"Redis at {url} is unreachable"):
        TokenCache(url)
    assert time.monotonic() - start < OP_TIMEOUT_S / 3


def test_unreachable_message_hides_the_password():
    url = f"redis://:s3cret@127.0.0.1:{_unused_port()}/0"
    with pytest.raises(CacheUnavailable) as info:
        connect_redis(url)
    assert "s3cret" not in str(info.value) and "127.0.0.1" in str(info.value)


def test_wrong_or_missing_password_says_authentication_failed():
    with EmbeddedRedis(maxmemory="32mb") as server:
        admin = connect_redis(server.url)
        admin.config_set("requirepass", "right")
        admin.close()
        for url in (f"redis://:wrong@127.0.0.1:{server.port}/0", server.url):
            with pytest.raises(CacheUnavailable, match="authentication failed") as info:
                connect_redis(url)
            assert "unreachable" not in str(info.value) and "wrong" not in str(info.value)
        connect_redis(f"redis://:right@127.0.0.1:{server.port}/0").close()


def test_server_gone_mid_use_raises_cache_unavailable(request):
    server = EmbeddedRedis(maxmemory="32mb").start()
    try:
        cache = TokenCache(server.url)
        key = fresh_key(request)
        cache.put(key, make_tokens())
        assert cache.get(key) is not None
    finally:
        server.stop()
    start = time.monotonic()
    with pytest.raises(CacheUnavailable, match="127.0.0.1"):
        cache.get(key)
    with pytest.raises(CacheUnavailable):
        cache.put(key, make_tokens())
    with pytest.raises(CacheUnavailable):
        cache.exists(key)
    assert time.monotonic() - start < OP_TIMEOUT_S / 3  # three calls, none waiting on a timeout


def test_embedded_redis_starts_configured_and_stops_cleanly():
    with EmbeddedRedis(maxmemory="32mb") as server:
        assert server.url.startswith("redis://127.0.0.1:") and server.running
        client = connect_redis(server.url)
        config = client.config_get("*")
        assert config["bind"] == "127.0.0.1"
        assert config["save"] == "" and config["appendonly"] == "no"
        assert config["maxmemory"] == str(32 << 20) and config["maxmemory-policy"] == "allkeys-lru"
        pid, workdir, port = server._process.pid, server._workdir, server.port
        assert workdir.is_dir()
        client.close()
    assert not server.running
    assert not os.path.exists(f"/proc/{pid}")
    assert not workdir.exists()
    with pytest.raises(CacheUnavailable):
        connect_redis(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    server.stop()  # a second stop is harmless


def _wait_until(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_embedded_redis_dies_with_a_killed_starter():
    starter = subprocess.Popen(
        [sys.executable, "-c", "import os, signal\n"
         "from workers.redis_server import EmbeddedRedis\n"
         "server = EmbeddedRedis(maxmemory='32mb').start()\n"
         "print(server._process.pid, server._workdir, flush=True)\n"
         "os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no finally: as the OOM killer does it\n"],
        stdout=subprocess.PIPE, text=True)
    server_pid, workdir = starter.stdout.readline().split()
    server_pid, workdir = int(server_pid), Path(workdir)
    assert starter.wait(timeout=60) == -signal.SIGKILL
    try:
        assert _wait_until(lambda: not _running(server_pid)), "the embedded redis-server outlived its starter"
    finally:
        if _running(server_pid):
            os.kill(server_pid, signal.SIGKILL)
    assert workdir.is_dir() and clean_stale_workdirs(workdir.parent) >= 1  # what the next start does
    assert not workdir.exists()


def _answers(port: int) -> bool:
    try:
        connect_redis(f"redis://127.0.0.1:{port}/0", timeout_s=0.5).close()
        return True
    except CacheUnavailable:
        return False


def test_next_start_cleans_what_a_dead_program_left(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    stale, live = tmp_path / "dymu-redis-stale", tmp_path / "dymu-redis-live"
    stale.mkdir()
    live.mkdir()
    # A server leaked by a starter that could not take it along (no PR_SET_PDEATHSIG, as an older version).
    port = _unused_port()
    leaked = subprocess.Popen([str(find_redis_server()), "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--dir", str(stale)], stdout=subprocess.DEVNULL)
    try:
        (stale / "owner.json").write_text(json.dumps({"owner": dead.pid, "server": leaked.pid}))
        (live / "owner.json").write_text(json.dumps({"owner": os.getpid(), "server": leaked.pid}))
        assert _wait_until(lambda: _answers(port))  # up, its command line rewritten to its own title
        assert _serves_from(leaked.pid, stale)
        assert clean_stale_workdirs(tmp_path) == 1
        assert leaked.wait(timeout=30) == -signal.SIGKILL
        assert not stale.exists() and live.is_dir()  # a live program's folder is left alone
    finally:
        if leaked.poll() is None:
            leaked.kill()
            leaked.wait()


def test_embedded_redis_reports_a_missing_binary(tmp_path):
    with pytest.raises(CacheUnavailable, match="cannot run"):
        EmbeddedRedis(binary=tmp_path / "no-redis-server").start()


def test_embedded_redis_retries_when_another_server_took_its_port(monkeypatch):
    with EmbeddedRedis(maxmemory="32mb") as squatter:
        free_ports = iter([squatter.port, _unused_port()])
        monkeypatch.setattr("workers.redis_server._free_loopback_port", lambda: next(free_ports))
        with EmbeddedRedis(maxmemory="32mb") as server:
            assert server.port != squatter.port
            assert connect_redis(server.url).info("server")["process_id"] == server._process.pid


def test_embedded_redis_is_not_fooled_by_another_server_on_its_port(monkeypatch, tmp_path):
    # A stand-in binary that stays up a moment without serving, then fails: meanwhile the squatter answers.
    fake_server = tmp_path / "fake-redis-server"
    fake_server.write_text("#!/bin/sh\nsleep 0.2\nexit 3\n")
    fake_server.chmod(0o755)
    with EmbeddedRedis(maxmemory="32mb") as squatter:
        monkeypatch.setattr("workers.redis_server._free_loopback_port", lambda: squatter.port)
        with pytest.raises(CacheUnavailable, match="exited with code 3"):
            EmbeddedRedis(binary=fake_server).start()


def test_embedded_redis_that_cannot_start_says_why():
    with pytest.raises(CacheUnavailable, match="maxmemory"):
        EmbeddedRedis(maxmemory="lots").start()
