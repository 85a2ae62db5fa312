"""End-to-end benchmark: one video question at every preset, on a LLaVA-OneVision-shaped random model.

The clip is 32 frames of a mostly static camera view (a box crosses it in the middle quarter). The model has
the real shapes of llava-onevision-qwen2-0.5b (SigLIP-so400m encoder: 26 layers of width 1152 at 384 px;
Qwen2-0.5B LLM: 24 layers of width 896) with random weights, saved and loaded like a real checkpoint.
Thresholds are calibrated on the clip itself before timing. Reports tokens and wall time per stage for
off/low/mid/high in one run, and the total of each preset against off (target: mid <= 0.5 x off).

    python bench/e2e.py                      # the full-size run (CPU: ~10 minutes)
    python bench/e2e.py --small              # a quick run on a narrower model
    python bench/e2e.py --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from dymu.families import load_family
from dymu.tiny import TinySizes, make_tiny_checkpoint
from dymu.config import make_config
from pipeline.sample_media import write_scene_video
from dymu.videoqa import VideoQA

FULL = TinySizes(vision_width=1152, vision_layers=26, vision_heads=16, vision_mlp=4304,
                 text_width=896, text_layers=24, text_heads=14, text_kv_heads=2, text_mlp=4864, vocab_size=1024)
SMALL = TinySizes(vision_width=384, vision_layers=12, vision_heads=6, text_width=384, text_layers=8,
                  text_heads=6, text_kv_heads=2, vocab_size=1024)


def run_preset(family, clip: Path, preset: str, args: argparse.Namespace) -> dict:
    config = make_config(preset, model=args.model_dir, num_frames=args.frames, max_new_tokens=args.answer_tokens)
    qa = VideoQA(family, config)
    qa.visual_tokenizer(qa.read(clip))  # calibrate (when needed) before the clock starts
    started = time.perf_counter()
    media = qa.read(clip)
    tokens = qa.encode(media)
    answer = qa.answer(tokens, "Describe what happens in this video.", source=str(clip))
    total = time.perf_counter() - started
    report = answer.report
    return {"preset": preset, "total": total, "report": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a narrower model, for a quick run")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--presets", default="off,low,mid,high")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        import os

        os.environ["DYMU_CACHE"] = str(tmp_path / "cache")
        args.model_dir = str(make_tiny_checkpoint(tmp_path / "model", "llava-onevision", seed=0,
                                                  sizes=SMALL if args.small else FULL))
        clip = write_scene_video(tmp_path / "scene.mp4", num_frames=args.frames, size=384)
        family = load_family(args.model_dir, args.device, args.dtype)
        device = next(family.model.parameters()).device
        print(f"model: {'small' if args.small else 'LLaVA-OneVision-0.5B-shaped'} random weights on {device}, "
              f"{family.model.dtype}; clip: {args.frames} frames, mostly static; answer: {args.answer_tokens} tokens\n")
        results = [run_preset(family, clip, preset, args) for preset in args.presets.split(",")]

    base = next((r["total"] for r in results if r["preset"] == "off"), None)
    print("| preset | DToMe tokens/frame | rows after temporal | LLM visual rows / positions | encode s | prefill s "
          "| decode ms/token | total s | total vs off |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rep = r["report"]
        t, s, llm = rep["tokens"], rep["seconds"], rep["llm"]
        per_frame = sum(t["dtome_per_frame"]) / rep["frames"]
        ratio = f"{r['total'] / base:.2f}" if base else "-"
        print(f"| {r['preset']} | {per_frame:.0f} of {t['encoder_per_frame']} | {sum(t['temporal_new_per_frame'])} "
              f"| {t['llm_visual_rows']} / {t['llm_visual_positions']} | {s['encode'] + s['layout']:.2f} "
              f"| {s['prefill']:.2f} | {llm['decode_ms_per_token']:.1f} | {r['total']:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
