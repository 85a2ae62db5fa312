"""Benchmark the pipeline: does it run as fast as its slowest stage, and what does the token cache save?

On a local Ray with an embedded Redis and a small random-weight LLaVA-OneVision (wider and deeper than the
test checkpoints), it reports, in one run:

- items/s of the pipeline captioning ``--videos`` new videos (every stage busy on different videos at once),
  against items/s of each stage alone on the same actors (decoders, the encoder, the LLM worker), and the
  ratio to the slowest one (target >= 0.85);
- the time to answer a first question about a new video (decode + encode + answer) against a second one
  about the same video (token-cache hit: hash + lookup + answer) (target >= 5x faster).

    python bench/pipeline.py
    python bench/pipeline.py --videos 32 --frames 8 --decoders 2

On a machine without a GPU the stages share the CPU cores, so running them side by side can cost each one
speed; on GPUs (encoder and LLM each on its own) they do not. Ratios within one run are what to read.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as `python bench/pipeline.py`, this file's folder comes first on sys.path and its name would hide the
# `pipeline` package it benchmarks.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import ray  # noqa: E402

from dymu.tiny import TinySizes, make_tiny_checkpoint  # noqa: E402
from dymu.config import make_config  # noqa: E402
from pipeline.jobs import Job, Pipeline  # noqa: E402
from pipeline.runtime import open_runtime  # noqa: E402
from pipeline.sample_media import write_scene_video  # noqa: E402

log = logging.getLogger("bench.pipeline")

# The report's timings that make up each stage.
STAGE_SECONDS = {"decode": ("read",), "encode": ("encode", "layout"), "answer": ("prefill", "decode")}
# LLaVA-OneVision-0.5B's proportions (SigLIP-so400m: width 1152, 27 layers; Qwen2-0.5B: width 896, 24 layers)
# scaled down about 3.5x in width and depth: small enough for a CPU, large enough that encoding and answering
# are real work next to Ray's overheads, and in the real model's balance.
SIZES = TinySizes(vision_width=320, vision_layers=8, vision_heads=5, text_width=256, text_layers=7,
                  text_heads=4, text_kv_heads=2, vocab_size=512)


def rate(count: int, refs: list[Any]) -> float:
    """Items/s of work already submitted as ``refs``, timed until the last one is done."""
    started = time.perf_counter()
    ray.get(refs)
    return count / (time.perf_counter() - started)


def stage_rates(pipeline: Pipeline, paths: list[str], question: str) -> dict[str, float]:
    """Items/s of each stage alone, through the pipeline's own actors (every actor of the stage busy), each
    stage fed the previous one's outputs, which are ready before it starts."""
    decoders = pipeline.decoders.actors
    encoder, llm = pipeline.encoders.actors[0], pipeline.llms.actors[0]
    decoded = [decoders[i % len(decoders)].read.remote(path) for i, path in enumerate(paths)]
    rates = {"decode": rate(len(paths), [summary for summary, _ in decoded])}
    encoded = [encoder.encode.remote(media) for _, media in decoded]
    rates["encode"] = rate(len(paths), [summary for summary, _ in encoded])
    rates["answer"] = rate(len(paths), [llm.answer.remote(tokens, question) for _, tokens in encoded])
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16, help="frames sampled per video")
    parser.add_argument("--video-frames", type=int, default=32, help="frames in each (short) video")
    parser.add_argument("--decoders", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory(prefix="dymu-bench-") as tmp:
        root = Path(tmp)
        os.environ["DYMU_CACHE"] = str(root / "cache")  # thresholds calibrated here, not in the user's cache
        model = make_tiny_checkpoint(root / "model", "llava-onevision", seed=0, sizes=SIZES)
        videos = [str(write_scene_video(root / f"v{i:02d}.mp4", args.video_frames, 160, seed=i))
                  for i in range(args.videos + 2)]
        warmup, probe, batch = videos[0], videos[1], videos[2:]
        config = make_config("mid", None, model=str(model), num_frames=args.frames,
                             max_new_tokens=args.max_new_tokens)
        question = "Describe this video in detail."

        with open_runtime() as runtime, Pipeline(config, runtime.redis_url, decoders=args.decoders) as pipeline:
            pipeline.ask(warmup, question)  # actors started, thresholds calibrated, everything warm

            started = time.perf_counter()
            results = list(pipeline.run([Job(p, question) for p in batch]))
            wall = time.perf_counter() - started
            pipeline_rate = len(batch) / wall
            assert all(r.ok for r in results), [r.error for r in results if not r.ok]
            rates = stage_rates(pipeline, batch, question)

            first = pipeline.ask(probe, "What is in the room?")
            second = pipeline.ask(probe, "What moves across the room?")
            assert first.cache["status"] == "miss" and second.cache["status"] == "hit"

        slowest = min(rates, key=rates.get)
        # How busy the slowest stage's actors were during the pipeline run, and how long one video took them
        # there: a busy share near 100% with a longer time per video than alone means the stages competed for
        # the CPU cores, not that the runner left the bottleneck idle.
        workers = {"decode": args.decoders, "encode": 1, "answer": 1}[slowest]
        stage_s = [sum(r.answer.report["seconds"][name] for name in STAGE_SECONDS[slowest]) for r in results]
        busy = sum(stage_s) / (workers * wall)
        cpus = os.cpu_count()
        print(f"\n{len(batch)} videos of {args.video_frames} frames (160 px), {args.frames} sampled; model: vision "
              f"{SIZES.vision_width}x{SIZES.vision_layers}, LLM {SIZES.text_width}x{SIZES.text_layers}; "
              f"{args.max_new_tokens}-token answers; {args.decoders} decoders, 1 encoder, 1 LLM worker; "
              f"{cpus} CPU cores, no GPU\n")
        print("| measurement | value |")
        print("|---|---|")
        print(f"| pipeline, {len(batch)} new videos | {pipeline_rate:.2f} videos/s |")
        for stage, rate in rates.items():
            print(f"| {stage} alone{' (slowest)' if stage == slowest else ''} | {rate:.2f} videos/s |")
        print(f"| pipeline / slowest stage | {pipeline_rate / rates[slowest]:.0%} (target >= 85%) |")
        print(f"| {slowest} busy during the pipeline run | {busy:.0%} |")
        print(f"| {slowest}, seconds per video: alone / in the pipeline | {workers / rates[slowest]:.2f} / "
              f"{sum(stage_s) / len(stage_s):.2f} |")
        print(f"| first question on a new video | {first.seconds:.2f} s |")
        print(f"| second question, cache hit | {second.seconds:.2f} s |")
        print(f"| speed-up of the second question | {first.seconds / second.seconds:.1f}x (target >= 5x) |")


if __name__ == "__main__":
    main()
