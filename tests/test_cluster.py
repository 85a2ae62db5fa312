"""The docker-compose topology without Docker: a `ray start --head` node, a second `ray start` node joined to
it and a Redis, all started by hand; `dymu-video caption` and `ask` run against them from processes of their
own, with `--ray-address` and `--redis-url`, and the metrics show on the nodes' Prometheus endpoints.

Only the processes started here are stopped (each node runs with ``--block`` in a process group of its
own), never with `ray stop`, which would stop every Ray on the machine, the test session's included.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from media import changing_video
from workers.redis_server import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
RAY_CLI = shutil.which("ray") or shutil.which("ray", path=str(Path(sys.executable).parent))

pytestmark = pytest.mark.skipif(RAY_CLI is None, reason="the `ray` command line is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ports() -> list[str]:
    """Every port a node would otherwise take at a fixed default, so that two nodes share this machine
    (and neither collides with a Ray someone else runs here)."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def stop_process_group(process: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 2), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # `ray start --block` may be gone while its raylet and workers still shut down.
        time.sleep(0.5)


def kill_leftovers(marker: str) -> None:
    """Kill, by pid, any process whose command line names our temp dir (a Ray worker that left the group)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextmanager
def ray_node(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        process = subprocess.Popen([RAY_CLI, "start", "--block", "--disable-usage-stats", *args], env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        stop_process_group(process)


def wait_for_cpus(address: str, cpus: float, env: dict[str, str], logs: list[Path], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = subprocess.run([RAY_CLI, "status", f"--address={address}"], env=env, capture_output=True, text=True)
        if f"/{cpus:.1f} CPU" in status.stdout:
            return
        time.sleep(1)
    tails = "\n".join(log.read_text(errors="replace")[-1500:] for log in logs)
    pytest.fail(f"the cluster never showed {cpus} CPUs:\n{status.stdout}\n{status.stderr}\n{tails}")


@pytest.fixture
def cluster(tmp_path):
    """A head node and a worker node of 2 CPUs each, and a Redis: (ray address, redis url, env, metrics ports)."""
    # Short: Ray puts unix sockets under its temp dir, and their paths must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    # A token of our own, so that neither the cluster nor its clients touch the user's ~/.ray/auth_token.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port = free_port()
    address = f"127.0.0.1:{port}"
    head_ports, worker_ports = node_ports(), node_ports()
    logs = [tmp_path / "head.log", tmp_path / "worker.log"]
    try:
        with ExitStack() as stack:
            redis = stack.enter_context(EmbeddedRedis(maxmemory="64mb"))
            stack.enter_context(ray_node(
                ["--head", f"--port={port}", "--num-cpus=2", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
                 "--include-dashboard=false", f"--dashboard-port={free_port()}",
                 f"--ray-client-server-port={free_port()}", *head_ports], env, logs[0]))
            stack.enter_context(ray_node(
                [f"--address={address}", "--num-cpus=2", "--node-ip-address=127.0.0.1", *worker_ports], env, logs[1]))
            wait_for_cpus(address, 4, env, logs)
            metrics = [int(arg.split("=")[1]) for arg in head_ports + worker_ports if "metrics" in arg]
            yield address, redis.url, env, metrics
    finally:
        kill_leftovers(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def dymu_video(args: list[str], env: dict[str, str], timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def scrape(ports: list[int], name: str, timeout_s: float = 30) -> bool:
    """Whether any node's Prometheus endpoint shows metric ``name`` (exports run every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for port in ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                    if name in response.read().decode(errors="replace"):
                        return True
            except OSError:
                pass
        time.sleep(1)
    return False


def test_caption_and_ask_on_a_two_node_cluster(cluster, tiny_ov, tmp_path):
    address, redis_url, env, metrics_ports = cluster
    folder = tmp_path / "clips"
    folder.mkdir()
    clips = [changing_video(folder / f"{i}.mp4", num_frames=4, size=64, seed=300 + i) for i in range(4)]
    out = tmp_path / "captions.jsonl"
    common = ["--ray-address", address, "--redis-url", redis_url, "--model", str(tiny_ov), "--frames", "2",
              "--max-new-tokens", "4"]
    # Two decoders, an encoder and an LLM worker take one CPU each: they cannot all fit on one node.
    done = dymu_video(["caption", str(folder), "--out", str(out), "--no-progress", *common], env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["path"] for r in records) == sorted(str(c.resolve()) for c in clips)
    assert all(r["caption"] and r["cache"] == "miss" for r in records)

    # Another process, another question about a captioned video: its tokens come from the shared Redis.
    asked = dymu_video(["ask", str(clips[0]), "What moves?", "--json", *common], env)
    assert asked.returncode == 0, asked.stderr[-3000:]
    answer = json.loads(asked.stdout.strip().splitlines()[-1])
    assert answer["cache"]["status"] == "hit" and answer["cache"]["saved_seconds"] > 0
    assert answer["tokens"] == next(r["tokens"] for r in records if r["path"] == str(clips[0].resolve()))

    assert scrape(metrics_ports, "dymu_frames_decoded")
