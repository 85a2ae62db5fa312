"""Where a job runs: a Ray cluster or an embedded local Ray, and a Redis for the token cache.

Ray: ``--ray-address``, else ``$DYMU_RAY_ADDRESS``, else ``$RAY_ADDRESS`` (set by ``ray job submit`` for
the jobs it runs); with none, a local Ray is started for this program and stopped at its end. A Ray this
process is already connected to (a notebook, a test session) is used as it is.

Redis: ``--redis-url``, else ``$REDIS_URL``; with none, an embedded ``redis-server`` is started on
127.0.0.1 and stopped at the end (the cache then lasts as long as the program). ``--cache off`` runs
without one. A Redis that does not answer at the start is an error naming the way out.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlsplit

from dymu.errors import DymuError

log = logging.getLogger(__name__)

DEFAULT_RAY_CONNECT_TIMEOUT_S = 30.0


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs on the pipeline (ask, caption)."""
    g = p.add_argument_group("cluster and cache")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="Ray cluster to run on (host:6379 or ray://host:10001); default $DYMU_RAY_ADDRESS or "
                        "$RAY_ADDRESS, else a local Ray started for this run")
    add_ray_connect_timeout(g)
    g.add_argument("--redis-url", metavar="URL",
                   help="token cache, e.g. redis://:PASSWORD@host:6379/0; default $REDIS_URL, else a private "
                        "redis-server started for this run")
    g.add_argument("--cache", choices=("on", "off"), default="on",
                   help="reuse the merged tokens of videos seen before (default on)")
    g.add_argument("--decoders", type=int, help="frame-decoder actors (default 1 for ask, 2 for caption)")
    g.add_argument("--model-worker-cpus", type=float,
                   help="CPUs (torch threads) per encoder and LLM actor on a CPU-only cluster "
                        "(default: an equal share of the free CPUs)")


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def add_ray_connect_timeout(group: Any) -> None:
    group.add_argument("--ray-connect-timeout", type=_positive_seconds, default=DEFAULT_RAY_CONNECT_TIMEOUT_S, metavar="SECONDS",
                       help=f"give up connecting to --ray-address after this long (default "
                            f"{DEFAULT_RAY_CONNECT_TIMEOUT_S:g})")


@dataclass
class Runtime:
    ray_address: str | None  # None: a local Ray of this process
    redis_url: str | None  # None: no token cache
    embedded_redis: bool

    def describe_cache(self) -> str:
        if self.redis_url is None:
            return "off"
        from workers.redis_server import redact_url

        return "embedded redis-server (lasts for this run)" if self.embedded_redis else redact_url(self.redis_url)


def check_redis(url: str) -> None:
    """Raise ``CacheUnavailable`` (one line, with the ways out) unless Redis at ``url`` answers."""
    from workers.redis_server import CacheUnavailable, connect_redis  # redis-py: imported once it is needed

    try:
        connect_redis(url).close()
    except CacheUnavailable as exc:
        raise CacheUnavailable(f"{exc} (start it, pass another --redis-url, or --cache off to run without "
                               f"the token cache)") from None


def connect_ray(address: str | None, timeout_s: float = DEFAULT_RAY_CONNECT_TIMEOUT_S) -> bool:
    """Connect to the Ray at ``address`` (or the environment's), or start a local one.

    Connecting to a cluster takes at most about ``timeout_s`` and fails with one line (a ``DymuError``):
    nothing listening, a cluster that wants an authentication token, or no answer in time. Ray's own
    console noise (its C++ core's retries, its token notice) goes to the log (``-v``), not the terminal.
    Returns whether this call connected, so that the caller disconnects (and stops a local Ray) at the end.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("DYMU_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
    _quiet_ray()
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        check_ray_reachable(address, timeout_s)
        _init_within(address, timeout_s)
        _exit_on_sigterm()
    else:
        # "local": a new Ray for this program, never a cluster some other program left running here.
        ray.init(address="local", include_dashboard=False, configure_logging=False)
    return True


def _exit_on_sigterm() -> None:
    """What ray.init does in the main thread (ours ran in a helper): SIGTERM (``ray job stop``, docker stop)
    exits through ``sys.exit``, so that ``finally`` blocks disconnect and stop the embedded Redis. A handler
    the program set itself is kept."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _quiet_ray() -> None:
    """Ray's notices (e.g. "Token authentication is enabled ...") only with -v: the terminal is ours."""
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger("ray").setLevel(logging.ERROR)


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``host:port`` or ``ray://host:port`` address; None for what Ray resolves itself
    ("auto", "local", an address without a port)."""
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        port = parts.port
    except ValueError:
        raise DymuError(f"--ray-address {address!r}: the port is not a number") from None
    return (parts.hostname, port) if parts.hostname and port else None


def check_ray_reachable(address: str, timeout_s: float) -> None:
    """A ``DymuError`` at once when nothing listens at ``address`` (refused, or no route within ``timeout_s``)."""
    target = _host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout_s).close()
    except socket.timeout:
        raise DymuError(f"no Ray cluster answered at {address} within {timeout_s:g} s "
                        f"(--ray-connect-timeout)") from None
    except OSError as exc:
        raise DymuError(f"no Ray cluster at {address}: {exc.strerror or exc}") from None


# Set once a connecting thread was given up on: it sits in Ray's native code until the program ends, and an
# interpreter that finalises under it aborts (SIGABRT), so the CLI ends such a run with os._exit.
native_thread_left = False

_AUTH_SIGNS = ("InvalidAuthToken", "Unauthenticated", "authentication token", "auth_token")


def _init_within(address: str, timeout_s: float) -> None:
    """``ray.init(address)`` in a helper thread, given up after ``timeout_s`` (Ray retries for minutes);
    its native stderr is captured meanwhile, read for signs of a missing token, and logged at debug level."""
    import ray

    outcome: dict[str, BaseException | None] = {}

    def connect() -> None:
        try:
            ray.init(address=address, configure_logging=False)
            outcome["error"] = None
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        terminal = os.dup(2)
        os.dup2(capture.fileno(), 2)  # where Ray's C++ core writes its retries
        thread = threading.Thread(target=connect, name="dymu-ray-connect", daemon=True)
        try:
            thread.start()
            deadline = time.monotonic() + timeout_s
            while thread.is_alive() and time.monotonic() < deadline and not _wants_token(_read(capture)):
                thread.join(0.2)
        finally:
            captured = _read(capture)
            if thread.is_alive():
                _abandon_native_stderr(terminal)
            else:
                os.dup2(terminal, 2)
                os.close(terminal)
    if captured.strip():
        log.debug("Ray while connecting:\n%s", captured.rstrip())
    error = outcome.get("error", TimeoutError())
    if error is None:
        return
    if _wants_token(captured) or _wants_token(str(error)):
        raise DymuError(f"the Ray cluster at {address} wants an authentication token: set RAY_AUTH_MODE=token "
                        f"and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token")
    if isinstance(error, TimeoutError):
        raise DymuError(f"no Ray cluster answered at {address} within {timeout_s:g} s (--ray-connect-timeout)")
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise DymuError(f"cannot connect to the Ray cluster at {address}: {first_line}")


def _wants_token(text: str) -> bool:
    return any(sign in text for sign in _AUTH_SIGNS)


def _read(capture: Any) -> str:
    fd = capture.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")  # pread: the writers' offset stays


def _abandon_native_stderr(terminal: int) -> None:
    """The connecting thread cannot be stopped and goes on writing to descriptor 2 until the program ends
    (it is about to: the connection failed). Descriptor 2 goes to /dev/null for good, and Python's own
    stderr (our one line, logging) to ``terminal``, a copy of the real one."""
    global native_thread_left
    native_thread_left = True
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    old = sys.stderr
    sys.stderr = open(terminal, "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                      errors="backslashreplace")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is old:
            handler.setStream(sys.stderr)


@contextmanager
def open_runtime(ray_address: str | None = None, redis_url: str | None = None, cache: bool = True,
                 ray_connect_timeout_s: float = DEFAULT_RAY_CONNECT_TIMEOUT_S) -> Iterator[Runtime]:
    """Redis (checked, or started) and then Ray, for the length of the ``with`` block."""
    import ray

    redis_url = redis_url or os.environ.get("REDIS_URL") or None
    embedded = None
    if not cache:
        redis_url = None
    elif redis_url:
        check_redis(redis_url)
    else:
        from workers.redis_server import EmbeddedRedis

        embedded = EmbeddedRedis(maxmemory="2gb").start()
        redis_url = embedded.url
    try:
        connected = connect_ray(ray_address, ray_connect_timeout_s)
        try:
            yield Runtime(ray_address, redis_url, embedded is not None)
        finally:
            if connected:
                ray.shutdown()
    finally:
        if embedded is not None:
            embedded.stop()


def runtime_from_args(args: argparse.Namespace):
    """``open_runtime`` with the command line's options."""
    return open_runtime(args.ray_address, args.redis_url, args.cache == "on", args.ray_connect_timeout)
