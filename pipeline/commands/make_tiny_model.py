"""`dymu-video make-tiny-model DIR`: a random-weight checkpoint for offline smoke runs and tests."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight checkpoint (no download) for offline smoke runs",
        description=(
            "Write a complete Hugging Face checkpoint folder with random weights: config, safetensors "
            "weights, a tokenizer built locally, image/video processor configs and a chat template. It "
            "keeps the real image geometry (SigLIP 384px/14 = 729 patches, CLIP 336px/14 = 576 + CLS) with "
            "tiny widths, so every command runs on it in seconds. The Qwen-VL families keep their real geometry too "
            "(patch size, two frames per temporal slot, 2x2 merge, 112px windows, DeepStack taps) and their "
            "processors' pixel budgets. Its answers are random text."
        ),
    )
    p.add_argument("dir", help="folder to write (created if missing)")
    p.add_argument(
        "--family",
        choices=["llava-onevision", "llava", "qwen2.5-vl", "qwen3-vl"],
        default="llava-onevision",
        help=(
            "llava-onevision (SigLIP + Qwen2, images and video), llava (LLaVA-1.5: CLIP + Llama), qwen2.5-vl "
            "(window-attention ViT on 14px patches + Qwen2 with M-RoPE) or qwen3-vl (16px patches, DeepStack, "
            "Qwen3 with interleaved M-RoPE)"
        ),
    )
    p.add_argument("--seed", type=int, default=0, help="same seed, same weights (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dymu.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(args.dir, family=args.family, seed=args.seed)
    print(f"wrote a tiny {args.family} checkpoint to {path}")
    return 0
