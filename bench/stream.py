"""Live-feed benchmark: throughput per feed, answer latency, tokens added per second, memory over 10 minutes.

On a LLaVA-OneVision-shaped random-weight model (tiny by default, ``--small`` for a wider one):

1. Sustained frames/s per feed: 1 and 2 feeds at once, each a synthetic camera clip played in real time
   (``--realtime``, through the real reader processes) and sampled at ``--sample-fps``, answered every 5 s.
   Sustained = frames that reached the memory per second; the rest were dropped (oldest first).
2. Latency from a frame's arrival to the first answer that covers it, from the same runs: the newest frame
   of an answer waited ``latency``, the oldest frame it was first to cover ``max latency``.
3. Tokens added to memory per second at 1 frame/s for a static view, a view a box crosses, and a busy view
   (a new scene every frame), after the first frame.
4. Memory over a 10-minute feed at 1 frame/s, 60 s window: simulated faster than real time by encoding 60
   frames once and feeding their tokens again with synthetic timestamps into the feed memory (the same
   ``FeedMemory`` the stream uses, with its chunks in an embedded Redis on 127.0.0.1). Rows, positions,
   tensor bytes, Redis keys and the process RSS are printed once a minute: they stay flat.

    python bench/stream.py               # ~3 minutes on 2 CPU cores
    python bench/stream.py --small --device cuda
"""
from __future__ import annotations

import argparse
import logging
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as `python bench/stream.py`, this folder comes first on sys.path and bench/pipeline.py would hide the
# `pipeline` package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

from dymu.tiny import TinySizes, make_tiny_checkpoint  # noqa: E402
from dymu.config import make_config  # noqa: E402
from pipeline.ingest import FeedOptions  # noqa: E402
from pipeline.sample_media import scene_frames, write_video  # noqa: E402
from pipeline.stream import ChunkStore, FeedMemory, open_streams  # noqa: E402
from pipeline.stream_engine import LocalEngine  # noqa: E402
from workers.redis_server import EmbeddedRedis, connect_redis  # noqa: E402
from workers.token_cache import TokenCache  # noqa: E402

SMALL = TinySizes(vision_width=384, vision_layers=12, vision_heads=6, text_width=384, text_layers=8,
                  text_heads=6, text_kv_heads=2, vocab_size=1024)


def busy_frames(count: int, size: int, seed: int = 0) -> np.ndarray:
    """A different view every frame."""
    return np.stack([scene_frames(num_frames=1, size=size, seed=seed + i)[0] for i in range(count)])


def warm_up(engine: LocalEngine) -> None:
    """Calibrate the thresholds and run every batch size once: torch's first calls at a new shape are slow."""
    frames = list(scene_frames(num_frames=8, size=256))
    for size in range(8, 0, -1):
        tokens = engine.encode_frames(frames[:size], [float(t) for t in range(size)])
    memory = FeedMemory(window_s=60, threshold=engine.config.temporal_threshold)
    memory.add(tokens)
    engine.answer(memory.window(engine.newline()), "Describe what changed.")


def throughput(engine: LocalEngine, clip: Path, feeds: int, args: argparse.Namespace) -> dict:
    """Feeds played in real time through the real readers; frames/s that reached the memory, and latencies."""
    options = FeedOptions(sample_fps=args.sample_fps, realtime=True, queue_frames=8)
    results = []
    started = time.monotonic()
    with open_streams([str(clip)] * feeds, "Describe what changed.", every_s=5.0, window_s=30.0,
                      feed_options=options, engine=engine) as streams:
        for result in streams:  # ends when the clips end (bounded by their length)
            results.append(result)
        names = [feed.name for feed in streams.feeds]
        received = [feed.reader.sampled for feed in streams.feeds]
        dropped = [feed.reader.dropped for feed in streams.feeds]
    seconds = time.monotonic() - started
    return {
        "feeds": feeds, "seconds": seconds, "answers": len(results), "names": names,
        "sampled_per_s": statistics.mean(received) / args.clip_seconds,
        "sustained_per_s": statistics.mean(r - d for r, d in zip(received, dropped)) / args.clip_seconds,
        "dropped": sum(dropped), "received": sum(received),
        "latency": statistics.median(r.latency_s for r in results),
        "max_latency": statistics.median(r.max_latency_s for r in results),
        "answer_s": statistics.median(r.answer_s for r in results),
    }


def tokens_per_second(engine: LocalEngine, scenes: dict[str, np.ndarray]) -> dict[str, tuple[float, int]]:
    """Rows each scene adds to memory per second at 1 frame/s after its first frame, and rows in memory."""
    out = {}
    for name, frames in scenes.items():
        memory = FeedMemory(window_s=3600, threshold=engine.config.temporal_threshold)
        memory.add(engine.encode_frames(list(frames), [float(t) for t in range(len(frames))]))
        first = memory.state.frames[0].new_rows
        out[name] = ((memory.rows_added - first) / (len(frames) - 1), memory.state.num_rows)
    return out


def ten_minutes(engine: LocalEngine, redis_url: str, window_s: float = 60.0) -> list[dict]:
    """Memory once a minute over 600 frames at 1 frame/s (60 encoded frames fed ten times over)."""
    frames = scene_frames(num_frames=60, size=128, moving_share=0.3)
    tokens = engine.encode_frames(list(frames), [0.0] * len(frames))
    cache, client = TokenCache(redis_url), connect_redis(redis_url)
    chunks = ChunkStore(cache, "bench://feed", engine.config.model, "", engine.cache_settings(), chunk_s=10.0,
                        ttl_s=80, threshold=engine.config.temporal_threshold)
    memory = FeedMemory(window_s=window_s, threshold=engine.config.temporal_threshold, chunks=chunks)
    rows = []
    for second in range(600):
        frame = tokens[second % len(tokens)].to()
        frame.timestamps = [float(second)]
        memory.add([frame])
        if (second + 1) % 60 == 0:
            state = memory.state
            tensor_bytes = sum(t.numel() * t.element_size() for t in (state.embeds, state.sizes, state.mapping))
            rows.append({"minute": (second + 1) // 60, "frames": state.num_frames, "rows": state.num_rows,
                         "positions": state.num_positions, "tensor_kib": tensor_bytes / 1024,
                         "redis_keys": len(client.keys("dymu:tok:*")),  # the bench's own Redis: only these
                         "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    cache.close()
    client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a wider random model (slower)")
    parser.add_argument("--sample-fps", type=float, default=10.0, help="frames sampled per second per feed")
    parser.add_argument("--clip-seconds", type=int, default=20, help="length of the real-time clips")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(maxmemory="256mb") as redis_server:
        model = make_tiny_checkpoint(Path(tmp) / "model", family="llava-onevision", seed=0,
                                     sizes=SMALL if args.small else TinySizes())
        config = make_config(model=str(model), device=args.device, dtype=args.dtype, max_new_tokens=8)
        engine = LocalEngine.from_config(config, feeds=2)  # the most feeds it runs at once
        fps = 10
        clip = write_video(Path(tmp) / "camera.mp4", scene_frames(num_frames=args.clip_seconds * fps, size=256,
                                                                  moving_share=0.3), fps=fps)
        warm_up(engine)

        print(f"## Throughput and latency (clip {args.clip_seconds} s at {fps} fps, sampled at "
              f"{args.sample_fps:g} fps, answers every 5 s, window 30 s)\n")
        print("| feeds | sampled frames/s per feed | sustained frames/s per feed | dropped | answers "
              "| latency (newest frame) | latency (oldest new frame) | answer time |")
        print("|---|---|---|---|---|---|---|---|")
        for feeds in (1, 2):
            r = throughput(engine, clip, feeds, args)
            print(f"| {feeds} | {r['sampled_per_s']:.1f} | {r['sustained_per_s']:.1f} | {r['dropped']}/{r['received']} "
                  f"| {r['answers']} | {r['latency']:.2f} s | {r['max_latency']:.2f} s | {r['answer_s']:.2f} s |")

        scenes = {"static view": np.repeat(scene_frames(num_frames=1, size=256), 12, axis=0),
                  "a box crosses": scene_frames(num_frames=12, size=256, moving_share=1.0),
                  "busy (new view every frame)": busy_frames(12, 256)}
        noise = np.random.default_rng(0).normal(0, 1.5, scenes["static view"].shape)
        scenes["static view"] = np.clip(scenes["static view"] + noise, 0, 255).astype(np.uint8)
        print("\n## Tokens added to memory per second (1 frame/s, after the first frame)\n")
        print("| scene | tokens/s added | tokens in memory after 12 s |")
        print("|---|---|---|")
        for name, (per_s, total) in tokens_per_second(engine, scenes).items():
            print(f"| {name} | {per_s:.1f} | {total} |")

        print("\n## Memory over a 10-minute feed (1 frame/s, window 60 s, simulated time)\n")
        print("| minute | frames | tokens (rows) | positions | tensors KiB | Redis keys | process max RSS MiB |")
        print("|---|---|---|---|---|---|---|")
        for row in ten_minutes(engine, redis_server.url):
            print(f"| {row['minute']} | {row['frames']} | {row['rows']} | {row['positions']} | "
                  f"{row['tensor_kib']:.0f} | {row['redis_keys']} | {row['rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
