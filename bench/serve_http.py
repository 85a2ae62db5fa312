"""HTTP benchmark of `dymu-video serve`: requests/s and p50/p95 time to first token and total latency at
1, 8 and 32 concurrent clients, and the first vs the second question about the same video.

It starts the server in this process (a local Ray, a private redis-server, Ray Serve on 127.0.0.1), serves
generated clips from a loopback HTTP server (the server runs with --allow-private-urls for that) and drives
it with streaming requests from client threads (httpx). Every request streams, so that time to first token
is the first content chunk. Each round asks new questions about clips whose tokens are already cached
(warmed first), so it measures the LLM side; the first-vs-second figures use clips the server has not seen.

    python bench/serve_http.py                          # the tiny random-weight model (made on the spot)
    python bench/serve_http.py --shape ov-0.5b          # LLaVA-OneVision-0.5B-shaped random weights (slow on CPU:
        --clients 1 8 --per-client 2 --frames 4 --max-tokens 16 --warm-clips 1 --fresh-clips 1 takes ~10 minutes)
    python bench/serve_http.py --model DIR --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from dymu.tiny import TinySizes

# Run as `python bench/serve_http.py`, this folder comes first on sys.path and bench/pipeline.py would hide the
# `pipeline` package; tests/media.py writes the clips.
_HERE = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE.parent / "tests")]


# llava-onevision-qwen2-0.5b's shapes (as bench/e2e.py): SigLIP-so400m and Qwen2-0.5B, random weights.
OV_05B = TinySizes(vision_width=1152, vision_layers=26, vision_heads=16, vision_mlp=4304,
                   text_width=896, text_layers=24, text_heads=14, text_kv_heads=2, text_mlp=4864, vocab_size=1024)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def media_server(root: Path) -> str:
    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def one_request(server: str, model: str, url: str, question: str, max_tokens: int) -> dict:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}]}]}
    started = time.perf_counter()
    first = None
    usage = None
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            usage = event.get("usage") or usage
    total = time.perf_counter() - started
    return {"ttft": first if first is not None else total, "total": total, "usage": usage}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def round_of(server: str, model: str, urls: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    jobs = [(urls[i % len(urls)], f"Question {i}: what happens in this video?") for i in range(clients * per_client)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda job: one_request(server, model, *job, max_tokens), jobs))
    wall = time.perf_counter() - started
    ttft = [r["ttft"] for r in results]
    total = [r["total"] for r in results]
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "requests_per_s": len(results) / wall,
            "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttft), "ttft_p95": percentile(ttft, 0.95),
            "total_p50": statistics.median(total), "total_p95": percentile(total, 0.95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint folder or id (default: make a random-weight one)")
    parser.add_argument("--shape", choices=("tiny", "ov-0.5b"), default="tiny",
                        help="the random-weight model's shape when no --model is given")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--per-client", type=int, default=2, help="requests each client sends per round")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--warm-clips", type=int, default=4,
                        help="clips the rounds ask about, encoded and cached first (default 4)")
    parser.add_argument("--fresh-clips", type=int, default=2,
                        help="clips for the first-vs-second question (default 2); fewer of each for big shapes on CPU")
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="answers the LLM engine writes together (default 8, as `dymu-video serve`)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray
    from ray import serve

    from dymu.tiny import make_tiny_checkpoint
    from media import changing_video
    from pipeline.serve.app import build_app, settings_from_options
    from workers.redis_server import EmbeddedRedis

    work = Path(tempfile.mkdtemp(prefix="dymu-serve-bench-"))
    os.environ.setdefault("DYMU_CACHE", str(work / "cache"))  # calibrated thresholds stay out of the user's cache
    model = args.model
    if model is None:
        sizes = OV_05B if args.shape == "ov-0.5b" else None
        model = str(make_tiny_checkpoint(work / "model", family="llava-onevision", seed=0, sizes=sizes))
    clips = work / "clips"
    clips.mkdir()
    for i in range(args.warm_clips + args.fresh_clips):
        changing_video(clips / f"clip{i}.mp4", num_frames=16, size=96, seed=11 * i)
    base = media_server(clips)
    warm = [f"{base}/clip{i}.mp4" for i in range(args.warm_clips)]
    fresh = [f"{base}/clip{i}.mp4" for i in range(args.warm_clips, args.warm_clips + args.fresh_clips)]

    load = os.getloadavg()
    with EmbeddedRedis(maxmemory="1gb") as redis:
        ray.init(include_dashboard=False, configure_logging=False)
        settings = settings_from_options(model, preset=args.preset, allow_private_urls=True, redis_url=redis.url,
                                         num_frames=args.frames, device=args.device, dtype=args.dtype,
                                         max_batch=args.max_batch,
                                         max_concurrency=max(64, max(args.clients)))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings), name="bench", route_prefix="/")
        server = f"http://127.0.0.1:{port}"
        try:
            for url in warm:  # thresholds calibrated, tokens cached
                one_request(server, model, url, "Warm-up.", args.max_tokens)
            rounds = [round_of(server, model, warm, c, args.per_client, args.max_tokens) for c in args.clients]
            firsts = [one_request(server, model, url, "What happens first?", args.max_tokens) for url in fresh]
            seconds = [one_request(server, model, url, "What happens next?", args.max_tokens) for url in fresh]
        finally:
            serve.shutdown()
            ray.shutdown()

    print(f"model {model} (preset {args.preset}, {args.frames} frames, {args.max_tokens} answer tokens, streaming, "
          f"max_batch {args.max_batch}); load average at the start {load[0]:.1f}, at the end "
          f"{os.getloadavg()[0]:.1f}")
    print("| clients | requests | req/s | tokens/s | TTFT p50 | TTFT p95 | total p50 | total p95 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rounds:
        print(f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['ttft_p50']:.3f}s | {r['ttft_p95']:.3f}s | {r['total_p50']:.3f}s | {r['total_p95']:.3f}s |")
    first_vs_second = {
        "first": {"ttft": statistics.mean(r["ttft"] for r in firsts), "total": statistics.mean(r["total"] for r in firsts),
                  "cache": [r["usage"]["dymu"]["token_cache"] for r in firsts]},
        "second": {"ttft": statistics.mean(r["ttft"] for r in seconds),
                   "total": statistics.mean(r["total"] for r in seconds),
                   "cache": [r["usage"]["dymu"]["token_cache"] for r in seconds]}}
    for name, r in first_vs_second.items():
        print(f"{name} question on a new video: TTFT {r['ttft']:.3f}s, total {r['total']:.3f}s (token cache {r['cache']})")
    print(f"second / first TTFT: {first_vs_second['second']['ttft'] / first_vs_second['first']['ttft']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "first_vs_second": first_vs_second,
                                               "max_batch": args.max_batch}, indent=1))


if __name__ == "__main__":
    main()
