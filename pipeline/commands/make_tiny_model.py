"""`dymu-video make-tiny-model DIR`: a random-weight checkpoint for offline smoke runs and tests."""
from __future__ import annotations

import argparse
from pathlib import Path


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
    p.add_argument("dir", help="folder to write (created if missing; an existing one must be empty, or --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that is not empty (its files of the same names are replaced)")
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


def check_out_dir(path: str, overwrite: bool) -> None:
    """Refuse, before anything is written, a DIR that is a file, or a folder with something in it (a real
    checkpoint given by mistake would get random weights) unless ``overwrite``."""
    from dymu.errors import DymuError

    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DymuError(f"{path} is a file, not a folder")
    existing = folder.absolute()
    while not existing.exists():  # the nearest part of the path that exists must be a folder to create the rest in
        existing = existing.parent
    if not existing.is_dir():
        raise DymuError(f"{path} cannot be made: {existing} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise DymuError(f"{path} is not empty; pass --overwrite to write the tiny checkpoint into it anyway")


def run(args: argparse.Namespace) -> int:
    check_out_dir(args.dir, args.overwrite)
    from dymu.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(args.dir, family=args.family, seed=args.seed)
    print(f"wrote a tiny {args.family} checkpoint to {path}")
    return 0
