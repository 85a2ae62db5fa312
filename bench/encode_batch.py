"""Benchmark: the vision encoder on several queued videos, one at a time against batched across videos.

On a small random-weight LLaVA-OneVision (bench/pipeline.py's proportions: SigLIP-so400m and Qwen2-0.5B
scaled down about 3.5x) at preset ``mid``, it encodes ``--videos`` different videos of ``--frames`` frames
(distinct content, so DToMe keeps different token counts per frame) two ways:

- alone: ``VideoQA.encode`` on each video in turn (what the encoder worker did before batching);
- batched: ``VideoQA.encode_many`` on the queue, taken ``--batch-frames`` frames at a time as the encoder
  worker takes it (``dymu.batch_encode.take_batch``).

Rounds alternate alone / batched; it reports videos/s of each and the median and min of the per-round ratios
(batched / alone), and counts the videos whose tokens match both ways (same rows, embeddings within 1e-3).

    python bench/encode_batch.py                                   # 8 videos x 4 frames, batches of 16 frames
    python bench/encode_batch.py --batch-frames 8 16 32 --rounds 3
    python bench/encode_batch.py --device cuda --dtype bfloat16 --full-size   # SigLIP-so400m-sized, on a GPU

A CPU gains little from a batch (each frame's matrices are already large); a GPU at batch 1 mostly waits on
kernel launches and weight reads, which a batch shares. Read the ratio of the device you run on.
"""
from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from dymu.batch_encode import take_batch  # noqa: E402
from dymu.tiny import TinySizes, make_tiny_checkpoint  # noqa: E402
from dymu.videoqa import Media, VideoQA  # noqa: E402

log = logging.getLogger("bench.encode_batch")

SMALL = TinySizes(vision_width=320, vision_layers=8, vision_heads=5, text_width=256, text_layers=2,
                  text_heads=4, text_kv_heads=2, vocab_size=512)
# SigLIP-so400m's encoder (the decoder stays small: only the encoder runs here).
FULL = TinySizes(vision_width=1152, vision_layers=27, vision_heads=16, vision_mlp=4304, text_width=256,
                 text_layers=2, text_heads=4, text_kv_heads=2, vocab_size=512)


def scene(num_frames: int, size: int, seed: int) -> np.ndarray:
    """Frames of a slowly moving textured scene: smooth regions DToMe merges and edges it keeps."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 6, 3)).astype(np.float32)
    ys, xs = np.mgrid[0:size, 0:size] / size * 5
    frames = []
    for t in range(num_frames):
        y0, x0 = ys + 0.1 * t, xs + 0.05 * t
        iy, ix = np.clip(y0.astype(int), 0, 5), np.clip(x0.astype(int), 0, 5)
        frame = coarse[iy, ix] + rng.normal(0, 2, size=(size, size, 3))
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames)


def scene_video(name: str, args: argparse.Namespace, seed: int) -> Media:
    return Media(name, "video", frames=scene(args.frames, args.size, seed),
                 timestamps=[0.5 * t for t in range(args.frames)])


def encode_alone(qa: VideoQA, media: list[Media]) -> list:
    return [qa.encode(m) for m in media]


def encode_batched(qa: VideoQA, media: list[Media], batch_frames: int) -> list:
    out, queue = [], list(media)
    while queue:
        count = take_batch([len(m.frames) for m in queue], batch_frames)
        out.extend(qa.encode_many(queue[:count]))
        queue = queue[count:]
    return out


def timed(fn, device: torch.device) -> tuple[float, list]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, result


def same_tokens(a: list, b: list) -> int:
    """How many videos got the same tokens both ways (same rows, embeddings within 1e-3). A merge whose
    similarity lies within float rounding of its threshold may go either way when the batch changes."""
    return sum(torch.equal(x.mapping, y.mapping) and torch.allclose(x.embeds.float(), y.embeds.float(), atol=1e-3)
               for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=160, help="source frame side in pixels")
    parser.add_argument("--batch-frames", type=int, nargs="+", default=[16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--full-size", action="store_true", help="a SigLIP-so400m-sized encoder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    print_table(measure(args.videos, args.frames, args.size, args.batch_frames, args.rounds, args.device,
                        args.dtype, FULL if args.full_size else SMALL))


def print_table(result: dict) -> None:
    print(f"\n{result['videos']} videos x {result['frames']} frames, preset mid, "
          f"{'full-size' if result['full_size'] else 'small'} encoder, {result['device']} {result['dtype']}, "
          f"torch threads {torch.get_num_threads()}, {result['rounds']} rounds")
    print("| batch frames | alone videos/s | batched videos/s | speed-up median | min | DToMe tokens/frame | videos with equal tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['batch_frames']} | {r['alone_videos_s']:.2f} | {r['batched_videos_s']:.2f} | "
              f"{r['speedup_median']:.2f}x | {r['speedup_min']:.2f}x | {r['dtome_tokens_per_frame']:.0f} | "
              f"{r['videos_equal']} of {result['videos']} |")


def measure(videos: int = 8, frames: int = 4, size: int = 160, batch_frames: list[int] = (16,), rounds: int = 3,
            device: str = "cpu", dtype: str = "float32", sizes: TinySizes = SMALL) -> dict:
    """Videos/s alone and batched at each of ``batch_frames``: ``{"rows": [one dict per batch size]}``."""
    args = argparse.Namespace(frames=frames, size=size)
    with tempfile.TemporaryDirectory() as root:
        import os

        os.environ["DYMU_CACHE"] = str(Path(root) / "cache")  # thresholds calibrated here stay here
        on_gpu = device.startswith("cuda") and torch.cuda.is_available()  # weights drawn there: seconds, not a minute
        model = make_tiny_checkpoint(Path(root) / "model", "llava-onevision", seed=0, sizes=sizes,
                                     init_device="cuda" if on_gpu else None,
                                     dtype=getattr(torch, dtype) if on_gpu and dtype not in ("auto", "float32") else None)
        if on_gpu:  # the weights were drawn there: free them, so that a peak read later is the encoder's run
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        media = [scene_video(f"v{i}", args, i) for i in range(videos)]
        rows = []
        for batch in batch_frames:
            qa = VideoQA.from_pretrained(str(model), preset="mid", device=device, dtype=dtype,
                                         encode_batch_frames=batch)
            run_device = next(qa.family.model.parameters()).device
            # Thresholds are calibrated on a video of their own: calibration puts each one at a similarity
            # measured on its data, where a float-rounding change would flip a merge.
            qa.encode(scene_video("calibration", args, 10_000))
            reference = encode_alone(qa, media)  # warm-up
            alone_times, batched_times, ratios, agree = [], [], [], videos
            for _ in range(rounds):
                alone_s, alone = timed(lambda: encode_alone(qa, media), run_device)
                batched_s, batched = timed(lambda: encode_batched(qa, media, batch), run_device)
                agree = min(agree, same_tokens(alone, reference), same_tokens(batched, reference))
                alone_times.append(alone_s)
                batched_times.append(batched_s)
                ratios.append(alone_s / batched_s)
                log.warning("batch %d frames: alone %.2fs, batched %.2fs (%.2fx)", batch, alone_s, batched_s,
                            alone_s / batched_s)
            tokens = sum(sum(t.meta["stages"]["dtome_tokens_per_frame"]) for t in reference)
            rows.append({"batch_frames": batch, "alone_videos_s": videos / min(alone_times),
                         "batched_videos_s": videos / min(batched_times), "speedup_median": statistics.median(ratios),
                         "speedup_min": min(ratios), "dtome_tokens_per_frame": tokens / (videos * frames),
                         "videos_equal": agree})
            del qa
    return {"videos": videos, "frames": frames, "size": size, "rounds": rounds, "device": device, "dtype": dtype,
            "full_size": sizes == FULL, "rows": rows}


if __name__ == "__main__":
    main()
