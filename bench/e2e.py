"""End-to-end benchmark: one video question at every preset, on a LLaVA-OneVision-shaped random model
(or, with ``--family qwen2.5-vl | qwen3-vl``, a Qwen-VL one).

The clip is 32 frames of a mostly static camera view (a box crosses it in the middle quarter). The model has
the real shapes of llava-onevision-qwen2-0.5b (SigLIP-so400m encoder: 26 layers of width 1152 at 384 px;
Qwen2-0.5B LLM: 24 layers of width 896) with random weights, saved and loaded like a real checkpoint.
Thresholds are calibrated on the clip itself before timing. Reports tokens and wall time per stage for
off/low/mid/high in one run, and the total of each preset against off (target: mid <= 0.5 x off).

    python bench/e2e.py                      # the full-size run (CPU: ~10 minutes)
    python bench/e2e.py --small              # a quick run on a narrower model
    python bench/e2e.py --device cuda --dtype bfloat16
    python bench/e2e.py --family qwen2.5-vl --small     # Qwen2.5-VL geometry (14 px patches, 112 px windows)
    python bench/e2e.py --family qwen3-vl --small       # Qwen3-VL geometry (16 px patches, DeepStack)

The Qwen-VL models have the real geometry (patch size, 2x2 merger, two frames per temporal slot, windows,
DeepStack, M-RoPE) at the widths below; without --small they are Qwen2.5-VL-3B-shaped (a ViT of 32 blocks of
width 1280, a 36-layer LLM of width 2048): a GPU run. Fidelity column: KL(off || preset) of the first answer
token's distribution, the proxy for answer quality on random weights (0 = the same distribution).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import torch

from dymu.answer import question_sequence
from dymu.families import load_family
from dymu.llm import generate
from dymu.tiny import TinySizes, make_tiny_checkpoint
from dymu.config import make_config
from pipeline.sample_media import write_scene_video
from dymu.videoqa import VideoQA

FULL = TinySizes(vision_width=1152, vision_layers=26, vision_heads=16, vision_mlp=4304,
                 text_width=896, text_layers=24, text_heads=14, text_kv_heads=2, text_mlp=4864, vocab_size=1024)
SMALL = TinySizes(vision_width=384, vision_layers=12, vision_heads=6, text_width=384, text_layers=8,
                  text_heads=6, text_kv_heads=2, vocab_size=1024)
QWEN_FULL = TinySizes(vision_width=1280, vision_layers=32, vision_heads=16, vision_mlp=3420, text_width=2048,
                      text_layers=36, text_heads=16, text_kv_heads=2, text_mlp=11008, vocab_size=1024)
QWEN_SMALL = TinySizes(vision_width=384, vision_layers=8, vision_heads=6, text_width=384, text_layers=8,
                       text_heads=6, text_kv_heads=2, vocab_size=1024)
QUESTION = "Describe what happens in this video."


def first_token_logits(qa: VideoQA, tokens) -> torch.Tensor:
    """The next-token logits after the prompt (float32), with the preset's own prefill (VTU or not)."""
    config = dataclasses.replace(qa.config.generate_config(qa.family.config.text_config.num_hidden_layers),
                                 max_new_tokens=1, keep_logits=True)
    sequence = question_sequence(qa.family, tokens, QUESTION, "video")
    return generate(qa.family.model, sequence, config).logits[0]


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def run_preset(family, clip: Path, preset: str, args: argparse.Namespace) -> dict:
    config = make_config(preset, model=args.model_dir, num_frames=args.frames, max_new_tokens=args.answer_tokens)
    qa = VideoQA(family, config)
    qa.visual_tokenizer(qa.read(clip))  # calibrate (when needed) before the clock starts
    started = time.perf_counter()
    media = qa.read(clip)
    tokens = qa.encode(media)
    answer = qa.answer(tokens, QUESTION, source=str(clip))
    total = time.perf_counter() - started
    report = answer.report
    return {"preset": preset, "total": total, "report": report, "logits": first_token_logits(qa, tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava-onevision", choices=("llava-onevision", "qwen2.5-vl", "qwen3-vl"))
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
        qwen = args.family != "llava-onevision"
        sizes = (QWEN_SMALL if args.small else QWEN_FULL) if qwen else (SMALL if args.small else FULL)
        args.model_dir = str(make_tiny_checkpoint(tmp_path / "model", args.family, seed=0, sizes=sizes))
        clip = write_scene_video(tmp_path / "scene.mp4", num_frames=args.frames, size=384)
        family = load_family(args.model_dir, args.device, args.dtype)
        device = next(family.model.parameters()).device
        shape = "small" if args.small else ("Qwen2.5-VL-3B-shaped" if qwen else "LLaVA-OneVision-0.5B-shaped")
        print(f"model: {args.family}, {shape} random weights on {device}, "
              f"{family.model.dtype}; clip: {args.frames} frames, mostly static; answer: {args.answer_tokens} tokens\n")
        results = [run_preset(family, clip, preset, args) for preset in args.presets.split(",")]

    base = next((r["total"] for r in results if r["preset"] == "off"), None)
    reference = next((r["logits"] for r in results if r["preset"] == "off"), None)
    print("| preset | DToMe tokens/frame | rows after temporal | LLM visual rows / positions | encode s | prefill s "
          "| decode ms/token | total s | total vs off | KL vs off |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rep = r["report"]
        t, s, llm = rep["tokens"], rep["seconds"], rep["llm"]
        per_frame = sum(t["dtome_per_frame"]) / rep["slots"]  # per encoder unit (Qwen-VL: temporal slot)
        ratio = f"{r['total'] / base:.2f}" if base else "-"
        fidelity = f"{kl(reference, r['logits']):.4f}" if reference is not None else "-"
        print(f"| {r['preset']} | {per_frame:.0f} of {t['encoder_per_frame']} | {sum(t['temporal_new_per_frame'])} "
              f"| {t['llm_visual_rows']} / {t['llm_visual_positions']} | {s['encode'] + s['layout']:.2f} "
              f"| {s['prefill']:.2f} | {llm['decode_ms_per_token']:.1f} | {r['total']:.2f} | {ratio} | {fidelity} |")


if __name__ == "__main__":
    main()
