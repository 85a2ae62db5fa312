"""`dymu-video serve --model ID_OR_DIR`: an OpenAI-compatible chat endpoint with video and image input."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading

from dymu.errors import DymuError
from dymu.files import check_cache_dir
from pipeline.commands.ask import add_answer_options, add_model_options, config_overrides
from pipeline.validate import is_local_run

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model as an OpenAI-compatible chat API with video and image input (Ray Serve)",
        description=(
            "Serve POST /v1/chat/completions (content parts text, image_url, video_url; stream: true as SSE), "
            "GET /v1/models, GET /health and GET /metrics on Ray Serve, with the token cache shared by every "
            "client. Our knobs go in an extension field: \"dymu\": {\"frames\": 16, \"fps\": 1}."
        ),
        epilog=(
            "examples:\n"
            "  dymu-video serve --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf --preset mid\n"
            "  DYMU_API_KEY=secret dymu-video serve --model ./tiny --host 0.0.0.0 --allowed-media-dir /data\n"
            "\n"
            "Without an API key the server binds to loopback only. Media URLs: http(s) (public addresses only,\n"
            "unless --allow-private-urls), data: (base64), file:// under --allowed-media-dir."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p)
    add_answer_options(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--served-model-name", help="the model name clients send (default: --model as given)")
    g.add_argument("--api-key", help="clients must send 'Authorization: Bearer KEY' (default $DYMU_API_KEY)")
    g.add_argument("--allowed-media-dir", metavar="DIR", help="file:// URLs may read files under DIR (default: none)")
    g.add_argument("--allow-private-urls", action="store_true",
                   help="fetch URLs on loopback, private and link-local addresses too (off by default)")
    g.add_argument("--max-media-mb", type=float, default=64.0, help="largest media file in MiB (default 64)")
    g.add_argument("--max-video-seconds", type=float, default=3600.0, help="longest video (default 3600)")
    g.add_argument("--fetch-timeout", type=float, default=30.0, help="seconds for one download (default 30)")
    g.add_argument("--max-request-mb", type=float, default=32.0,
                   help="largest request body in MiB, inline media included; larger ones get 413 (default 32)")
    g.add_argument("--media-cache-mb", type=float, default=1024.0,
                   help="MiB of fetched media kept for reuse, least recently used dropped first (default 1024)")
    g.add_argument("--llms", type=int, default=1, help="replicas of the LLM engine deployment (default 1)")
    g.add_argument("--encoders", type=int, default=1, help="replicas of the vision encoder deployment (default 1)")
    g.add_argument("--max-concurrency", type=int, default=64,
                   help="requests one LLM replica accepts at once; its engine batches up to --max-batch of "
                        "them (default 64)")
    r = p.add_argument_group("cluster and cache")
    r.add_argument("--ray-address", metavar="ADDR", help="Ray cluster (default $DYMU_RAY_ADDRESS or $RAY_ADDRESS, "
                                                         "else a local Ray for this server)")
    r.add_argument("--redis-url", metavar="URL", help="token cache (default $REDIS_URL, else a private redis-server)")
    r.add_argument("--cache", choices=("on", "off"), default="on", help="token cache on or off (default on)")
    r.add_argument("--model-worker-cpus", type=float,
                   help="CPUs (torch threads) per encoder and LLM replica (default: a share of the cluster)")
    r.add_argument("--model-worker-gpus", type=float,
                   help="GPUs per encoder and LLM replica, 0.5 to share one (default: 1 each when the cluster "
                        "has GPUs, an equal share when it has fewer)")
    # A server's clients come at once: each LLM worker batches up to 8 answers unless told otherwise.
    p.set_defaults(func=run, max_batch=8)


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except (socket.gaierror, ValueError):
        return False


def settings_from_args(args: argparse.Namespace):
    """Every option checked, and the settings made, before Ray or Redis start."""
    if not 0 < args.port < 65536:
        raise DymuError(f"--port {args.port}: not a port number")
    if is_local_run(args.ray_address):
        check_cache_dir()  # jobs save the thresholds they calibrate there
    from pipeline.serve.app import settings_from_options  # imports Ray Serve (seconds): after the quick checks

    overrides = config_overrides(args)
    overrides.pop("max_frames")
    model = overrides.pop("model") or None
    if model is None:
        from dymu.config import DEFAULT_MODEL
        model = DEFAULT_MODEL
    settings = settings_from_options(
        model, preset=args.preset or "mid", served_name=args.served_model_name, api_key=args.api_key,
        allowed_media_dir=args.allowed_media_dir, allow_private_urls=args.allow_private_urls,
        max_media_mb=args.max_media_mb, max_video_seconds=args.max_video_seconds,
        max_frames=args.max_frames or 64, fetch_timeout=args.fetch_timeout, llms=args.llms, encoders=args.encoders,
        model_worker_cpus=args.model_worker_cpus, model_worker_gpus=args.model_worker_gpus,
        max_concurrency=args.max_concurrency, max_request_mb=args.max_request_mb,
        media_cache_mb=args.media_cache_mb, config_file=args.config_file, **overrides)
    if settings.api_key is None and not is_loopback(args.host):
        raise DymuError(f"--host {args.host}: without an API key the server listens on loopback only; pass "
                        f"--api-key or set DYMU_API_KEY to serve other machines")
    return settings


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    import ray
    from ray import serve

    from pipeline.runtime import open_runtime
    from pipeline.serve.app import build_app

    # The ingress keeps fetched media under this folder; it goes when the server stops (also on SIGINT/SIGTERM).
    settings.media_dir = tempfile.mkdtemp(prefix="dymu-serve-media-")
    try:
        with open_runtime(args.ray_address, args.redis_url, args.cache == "on") as runtime:
            settings.redis_url = runtime.redis_url
            settings.cache_node = ray.get_runtime_context().get_node_id()
            # SIGTERM (docker stop, systemd, kill) stops it like Ctrl-C: the finally blocks below stop Serve,
            # Ray and the private redis-server, and remove the media folder. Set once Ray is up (ray.init sets
            # its own) and before Serve answers, so that a SIGTERM as soon as it serves is ours.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            serve.start(http_options={"host": args.host, "port": args.port})
            try:
                serve.run(build_app(settings), name="dymu", route_prefix="/", blocking=False)
                log.warning("serving %s at http://%s:%d/v1 (preset %s, token cache: %s); Ctrl-C stops it",
                            settings.served_name, args.host, args.port, settings.config.preset,
                            runtime.describe_cache())
                threading.Event().wait()
            finally:
                serve.shutdown()
    finally:
        shutil.rmtree(settings.media_dir, ignore_errors=True)
    return 0
