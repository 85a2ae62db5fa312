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
import gc
import logging
import os
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
log = logging.getLogger("bench.e2e")
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


def run_preset(family, clip: Path, preset: str, model_dir: str, frames: int, answer_tokens: int) -> dict:
    config = make_config(preset, model=model_dir, num_frames=frames, max_new_tokens=answer_tokens)
    qa = VideoQA(family, config)
    qa.visual_tokenizer(qa.read(clip))  # calibrate (when needed) before the clock starts
    sync(family)
    started = time.perf_counter()
    media = qa.read(clip)
    tokens = qa.encode(media)
    answer = qa.answer(tokens, QUESTION, source=str(clip))
    sync(family)
    total = time.perf_counter() - started
    report = answer.report
    return {"preset": preset, "total": total, "report": report, "logits": first_token_logits(qa, tokens)}


def forget_checkpoint_weights() -> None:
    """Free the GPU memory the checkpoint's weights were drawn in, so that a peak read later is the model's run."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync(family) -> None:
    device = next(family.model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(family_name: str = "llava-onevision", small: bool = False, frames: int = 32, answer_tokens: int = 32,
            presets: str = "off,low,mid,high", device: str = "auto", dtype: str = "auto",
            sizes: TinySizes | None = None) -> dict:
    """Every preset on one random-weight model of ``family_name`` (``sizes``, or the full / --small shape):
    ``{"model": ..., "rows": [one dict per preset: tokens, stage seconds, total, total vs off, KL vs off]}``."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        os.environ["DYMU_CACHE"] = str(tmp_path / "cache")
        qwen = family_name != "llava-onevision"
        if sizes is None:
            sizes = (QWEN_SMALL if small else QWEN_FULL) if qwen else (SMALL if small else FULL)
            shape = "small" if small else ("Qwen2.5-VL-3B-shaped" if qwen else "LLaVA-OneVision-0.5B-shaped")
        else:
            shape = "custom"
        # On a GPU the random weights are drawn there and saved in the run's dtype (a 3B model: seconds, not a
        # minute of CPU initialisation and a float32 file twice the size).
        init_device = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else None
        save_dtype = getattr(torch, dtype) if dtype not in ("auto", "float32") and init_device else None
        model_dir = str(make_tiny_checkpoint(tmp_path / "model", family_name, seed=0, sizes=sizes,
                                             init_device=init_device, dtype=save_dtype))
        forget_checkpoint_weights()
        clip = write_scene_video(tmp_path / "scene.mp4", num_frames=frames, size=384)
        family = load_family(model_dir, device, dtype)
        model_device = next(family.model.parameters()).device
        model = {"family": family_name, "shape": shape, "device": str(model_device),
                 "dtype": str(family.model.dtype).removeprefix("torch."), "frames": frames,
                 "answer_tokens": answer_tokens}
        log.info("model: %s, %s random weights on %s, %s; clip: %d frames, mostly static; answer: %d tokens",
                 family_name, shape, model_device, family.model.dtype, frames, answer_tokens)
        results = [run_preset(family, clip, preset, model_dir, frames, answer_tokens) for preset in presets.split(",")]
        del family

    base = next((r["total"] for r in results if r["preset"] == "off"), None)
    reference = next((r["logits"] for r in results if r["preset"] == "off"), None)
    rows = []
    for r in results:
        rep = r["report"]
        t, s, llm = rep["tokens"], rep["seconds"], rep["llm"]
        rows.append({
            "preset": r["preset"],
            "dtome_tokens_per_frame": sum(t["dtome_per_frame"]) / rep["slots"],  # per encoder unit (Qwen-VL: slot)
            "encoder_tokens_per_frame": t["encoder_per_frame"],
            "rows_after_temporal": sum(t["temporal_new_per_frame"]),
            "llm_visual_rows": t["llm_visual_rows"], "llm_visual_positions": t["llm_visual_positions"],
            "encode_s": s["encode"] + s["layout"], "prefill_s": s["prefill"],
            "decode_ms_per_token": llm["decode_ms_per_token"], "total_s": r["total"],
            "total_vs_off": r["total"] / base if base else None,
            "kl_vs_off": kl(reference, r["logits"]) if reference is not None else None,
        })
    return {"model": model, "rows": rows}


def print_table(result: dict) -> None:
    m = result["model"]
    print(f"model: {m['family']}, {m['shape']} random weights on {m['device']}, {m['dtype']}; clip: {m['frames']} "
          f"frames, mostly static; answer: {m['answer_tokens']} tokens\n")
    print("| preset | DToMe tokens/frame | rows after temporal | LLM visual rows / positions | encode s | prefill s "
          "| decode ms/token | total s | total vs off | KL vs off |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        ratio = f"{r['total_vs_off']:.2f}" if r["total_vs_off"] is not None else "-"
        fidelity = f"{r['kl_vs_off']:.4f}" if r["kl_vs_off"] is not None else "-"
        print(f"| {r['preset']} | {r['dtome_tokens_per_frame']:.0f} of {r['encoder_tokens_per_frame']} "
              f"| {r['rows_after_temporal']} | {r['llm_visual_rows']} / {r['llm_visual_positions']} "
              f"| {r['encode_s']:.2f} | {r['prefill_s']:.2f} | {r['decode_ms_per_token']:.1f} | {r['total_s']:.2f} "
              f"| {ratio} | {fidelity} |")


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
    print_table(measure(args.family, args.small, args.frames, args.answer_tokens, args.presets, args.device,
                        args.dtype))


if __name__ == "__main__":
    main()
