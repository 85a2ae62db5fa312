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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from workers.redis_server import CacheUnavailable, EmbeddedRedis, connect_redis, redact_url

log = logging.getLogger(__name__)


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs on the pipeline (ask, caption)."""
    g = p.add_argument_group("cluster and cache")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="Ray cluster to run on (host:6379 or ray://host:10001); default $DYMU_RAY_ADDRESS or "
                        "$RAY_ADDRESS, else a local Ray started for this run")
    g.add_argument("--redis-url", metavar="URL",
                   help="token cache, e.g. redis://:PASSWORD@host:6379/0; default $REDIS_URL, else a private "
                        "redis-server started for this run")
    g.add_argument("--cache", choices=("on", "off"), default="on",
                   help="reuse the merged tokens of videos seen before (default on)")
    g.add_argument("--decoders", type=int, help="frame-decoder actors (default 1 for ask, 2 for caption)")
    g.add_argument("--model-worker-cpus", type=float,
                   help="CPUs (torch threads) per encoder and LLM actor on a CPU-only cluster "
                        "(default: an equal share of the free CPUs)")


@dataclass
class Runtime:
    ray_address: str | None  # None: a local Ray of this process
    redis_url: str | None  # None: no token cache
    embedded_redis: bool

    def describe_cache(self) -> str:
        if self.redis_url is None:
            return "off"
        return "embedded redis-server (lasts for this run)" if self.embedded_redis else redact_url(self.redis_url)


def check_redis(url: str) -> None:
    """Raise ``CacheUnavailable`` (one line, with the ways out) unless Redis at ``url`` answers."""
    try:
        connect_redis(url).close()
    except CacheUnavailable as exc:
        raise CacheUnavailable(f"{exc} (start it, pass another --redis-url, or --cache off to run without "
                               f"the token cache)") from None


def connect_ray(address: str | None) -> bool:
    """Connect to the Ray at ``address`` (or the environment's), or start a local one.

    Returns whether this call connected, so that the caller disconnects (and stops a local Ray) at the end.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("DYMU_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, configure_logging=False)
    else:
        # "local": a new Ray for this program, never a cluster some other program left running here.
        ray.init(address="local", include_dashboard=False, configure_logging=False)
    return True


@contextmanager
def open_runtime(ray_address: str | None = None, redis_url: str | None = None, cache: bool = True) -> Iterator[Runtime]:
    """Redis (checked, or started) and then Ray, for the length of the ``with`` block."""
    import ray

    redis_url = redis_url or os.environ.get("REDIS_URL") or None
    embedded = None
    if not cache:
        redis_url = None
    elif redis_url:
        check_redis(redis_url)
    else:
        embedded = EmbeddedRedis(maxmemory="2gb").start()
        redis_url = embedded.url
    try:
        connected = connect_ray(ray_address)
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
    return open_runtime(args.ray_address, args.redis_url, args.cache == "on")
