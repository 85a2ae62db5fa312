"""`dymu-video demo`: the whole main job on a fresh machine, offline: a sample clip, a question, the answer
and what it cost."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

QUESTION = "What happens in this video?"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="answer a question about a generated sample clip, offline, and show what it cost",
        description=(
            "Write a 32-frame sample clip (a static room that a box crosses), then answer a question about it "
            "at the `off` preset (the stock model) and at `mid`, printing each answer and its token and timing "
            "report. Without --model it uses a tiny random-weight checkpoint made on the spot (no download), "
            "so the answers are random words while the token counts and timings are real."
        ),
    )
    p.add_argument("--model", help="a checkpoint (hub id or folder) instead of the tiny random one")
    p.add_argument("--workdir", default=None, help="where the sample clip and tiny model go (default: the dymu cache)")
    p.add_argument("--frames", type=int, default=16, help="frames sampled from the clip (default 16)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dymu.files import cache_dir, check_cache_dir

    if not args.workdir:
        check_cache_dir()
    from dymu.tiny import make_tiny_checkpoint
    from pipeline.sample_media import write_scene_video
    from dymu.videoqa import VideoQA, format_report

    workdir = Path(args.workdir) if args.workdir else cache_dir() / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    clip = workdir / "sample-scene.mp4"
    if not clip.exists():
        write_scene_video(clip.with_suffix(".partial.mp4"), num_frames=32, size=256).rename(clip)
    model = args.model
    if model is None:
        model_dir = workdir / "tiny-llava-onevision"
        if not (model_dir / "model.safetensors").exists():
            make_tiny_checkpoint(model_dir, "llava-onevision", seed=0)
        model = str(model_dir)
    print(f"clip: {clip}\nmodel: {model}\nquestion: {QUESTION}\n")
    for preset in ("off", "mid"):
        qa = VideoQA.from_pretrained(model, preset=preset, num_frames=args.frames, max_new_tokens=48)
        print(f"--- preset {preset} ---")
        tokens = qa.encode(qa.read(clip))
        print("answer: ", end="", flush=True)
        answer = qa.answer(tokens, QUESTION, on_text=lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        print("\n" + format_report(answer.report) + "\n")
    return 0
