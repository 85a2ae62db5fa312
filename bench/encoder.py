"""Benchmark: DToMe on a SigLIP-so400m-shaped encoder (random weights), presets low/mid/high against off.

For each preset it calibrates thresholds on a handful of synthetic images (flat, gradient, textured,
natural-ish), then runs the encoder with them and reports, per preset: tokens kept, the encoder's FLOPs
ratio against off (counted from every layer's token counts), its wall-time ratio against off, and
time saved / FLOPs saved. That last one is the target: >= 0.85, i.e. merging costs less than 15% of what it
saves. "off" is the same runner with every threshold at 1.0, so the ratio isolates what merging itself
costs; transformers' stock forward is timed too, for reference. Modes are timed batch by batch,
interleaved, best of a few rounds; still, on a shared machine the times are noisy.

    python bench/encoder.py --threads 1     # 8 images, batch 4, bf16 (fast on CPUs with AMX; CUDA if present)
    python bench/encoder.py --dtype float32 --images 4
    python -m bench.encoder --family qwen2.5-vl --images 2 --threads 1     # Qwen2.5-VL-7B-shaped, 448px and 720p
    python -m bench.encoder --family qwen2.5-vl --compare --sizes 448x448  # merge units and rotary forms

On a busy 2-core machine, prefer --threads 1: with two OpenMP threads every mid-sized op waits on a thread
that another process has taken, which charges the runner's extra small ops far more than their work.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dymu.calibrate import calibrate, preset_keep
from dymu.families.base import resolve_device_dtype
from dymu.merge import Edges
from dymu.vision import DToMeEncoder, ThresholdPolicy

log = logging.getLogger("bench.encoder")

IMAGE, PATCH = 384, 14
TOKENS = (IMAGE // PATCH) ** 2
PRESETS = ("low", "mid", "high")


@dataclass(frozen=True)
class Shape:
    """The encoder's widths and depth (the image geometry, IMAGE / PATCH, is always SigLIP's)."""

    width: int = 1152
    layers: int = 27
    heads: int = 16
    mlp: int = 4304


SO400M = Shape()


def build_encoder(device: torch.device, dtype: torch.dtype, shape: Shape = SO400M) -> nn.Module:
    """A random-weight SigLIP-so400m-shaped vision tower.

    Built on the meta device and initialised lecun-normal here (as transformers does for SigLIP), because
    transformers' own initialisation of 400M parameters takes ~20 s on two cores.
    """
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=shape.width, intermediate_size=shape.mlp, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        image_size=IMAGE, patch_size=PATCH, vision_use_head=False,
    )
    with torch.device("meta"):
        model = SiglipVisionModel(config)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                nn.init.normal_(module.weight, std=fan_in**-0.5)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=shape.width**-0.5)
        model.embeddings.position_ids.copy_(torch.arange(TOKENS, device=device)[None])
    return model.to(dtype).eval()


def synthetic_images(count: int, seed: int = 0) -> torch.Tensor:
    """(count, 3, S, S) pixels in [-1, 1], cycling through flat, gradient, textured and natural-ish."""
    rng = np.random.default_rng(seed)
    ramp = torch.linspace(-1, 1, IMAGE)

    def smooth_noise(cells: int) -> torch.Tensor:
        noise = torch.from_numpy(rng.normal(size=(1, 3, cells, cells))).float()
        return F.interpolate(noise, size=(IMAGE, IMAGE), mode="bicubic")[0]

    images = []
    for i in range(count):
        kind = i % 4
        if kind == 0:  # flat colour
            image = torch.from_numpy(rng.uniform(-1, 1, size=(3, 1, 1))).float().expand(3, IMAGE, IMAGE)
        elif kind == 1:  # linear gradient between two colours
            angle = rng.uniform(0, 2 * math.pi)
            t = (math.cos(angle) * ramp[:, None] + math.sin(angle) * ramp[None, :]) / 2 + 0.5
            a, b = (torch.from_numpy(rng.uniform(-1, 1, size=(3, 1, 1))).float() for _ in range(2))
            image = a * (1 - t) + b * t
        elif kind == 2:  # busy texture: fine noise over stripes
            stripes = torch.sin(ramp[None, :] * rng.uniform(20, 60) + ramp[:, None] * rng.uniform(0, 30))
            image = 0.5 * stripes.expand(3, IMAGE, IMAGE) + 0.5 * smooth_noise(96)
        else:  # natural-ish: 1/f-like sum of scales (large smooth regions with some detail)
            image = sum(smooth_noise(cells) / cells**0.8 for cells in (2, 4, 8, 16, 32, 64))
            image = image / image.abs().max()
        images.append(image.clamp(-1, 1))
    return torch.stack(images)


def layer_flops(tokens_in: int, tokens_out: int, shape: Shape = SO400M) -> float:
    """One layer: q/k/v/out projections and attention on the tokens it starts with, the MLP on those left."""
    w = shape.width
    return 8 * tokens_in * w**2 + 4 * tokens_in**2 * w + 4 * tokens_out * w * shape.mlp


def encoder_flops(merges_per_layer: list[int], shape: Shape = SO400M) -> float:
    flops = 2 * TOKENS * 3 * PATCH * PATCH * shape.width  # patch embedding
    tokens = TOKENS
    for merges in merges_per_layer:
        flops += layer_flops(tokens, tokens - merges, shape)
        tokens -= merges
    return flops


@dataclass
class CountingPolicy(ThresholdPolicy):
    """Thresholds that also record each layer's merges per image, for the FLOPs count."""

    merges: dict[int, torch.Tensor] = field(default_factory=dict)

    def choose(self, layer: int, edges: Edges) -> torch.Tensor:
        merge = super().choose(layer, edges)
        self.merges[layer] = merge.sum(dim=1)
        return merge

    def per_image(self, num_images: int) -> list[list[int]]:
        zero = torch.zeros(num_images, dtype=torch.long)
        table = torch.stack([self.merges.get(layer, zero).cpu() for layer in range(len(self.taus))], dim=1)
        self.merges.clear()
        return table.tolist()


def _timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). CPU time is what another process's load hides from wall
    time when running single-threaded; on CUDA only the wall time means anything."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="synthetic images (default 8)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=2, help="timing rounds; each time is the best (default 2)")
    parser.add_argument("--family", choices=["siglip", "qwen2.5-vl", "qwen3-vl"], default="siglip",
                        help="siglip (default), or a Qwen2.5-VL-7B / Qwen3-VL-8B-shaped encoder (bench/encoder_qwen.py)")
    parser.add_argument("--sizes", nargs="+", choices=["448x448", "1280x720"], default=["448x448", "1280x720"],
                        help="Qwen-VL: image sizes to time (default both)")
    parser.add_argument("--calibration-images", type=int, default=8, help="Qwen-VL: calibration images (default 8)")
    parser.add_argument("--compare", action="store_true",
                        help="Qwen-VL: compare merge groupings and rotary forms at --preset on the first --sizes")
    parser.add_argument("--preset", default="mid", choices=PRESETS, help="Qwen-VL --compare: preset (default mid)")
    parser.add_argument("--taus-cache", default=None, help="Qwen-VL: JSON file to keep calibrated thresholds in")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.family != "siglip":
        try:  # python -m bench.encoder
            from bench.encoder_qwen import run_compare, run_presets
        except ImportError:  # python bench/encoder.py: bench/ is the script's folder
            from encoder_qwen import run_compare, run_presets

        (run_compare if args.compare else run_presets)(args)
        return
    print_table(measure(args.images, args.batch_size, args.device, args.dtype, args.rounds))


def measure(images: int = 8, batch_size: int = 4, device: str = "auto", dtype: str = "bfloat16", rounds: int = 2,
            shape: Shape = SO400M) -> dict:
    """Calibrate low/mid/high and time them against off and stock; the table's figures as a dict."""
    device, dtype = resolve_device_dtype(device, dtype)
    torch.manual_seed(0)

    started = time.perf_counter()
    model = build_encoder(device, dtype, shape)
    batches = synthetic_images(images).to(device, dtype).split(batch_size)
    log.info("built the encoder and %d images in %.0f s", images, time.perf_counter() - started)

    keep = {preset: preset_keep(preset, TOKENS) for preset in PRESETS}
    taus = {preset: calibrate(DToMeEncoder(model), batches, keep[preset]) for preset in PRESETS}
    log.info("calibrated %s in %.0f s", "/".join(PRESETS), time.perf_counter() - started)

    # Each (mode, batch) keeps its fastest of --rounds runs, modes interleaved batch by batch: a busy
    # machine then slows every mode alike, and a spike of load hits one run, not the result.
    modes = {"stock": lambda batch: model(batch), "off": lambda batch: DToMeEncoder(model)(batch)}
    best = {mode: np.full((len(batches), 2), np.inf) for mode in (*modes, *PRESETS)}  # (wall, cpu) per batch
    merges: dict[str, list[list[int]]] = {preset: [] for preset in PRESETS}
    kept: dict[str, list[int]] = {preset: [] for preset in PRESETS}
    with torch.no_grad():
        model(batches[0])  # warm-up; the DToMe runner was warmed up by calibration
        for round_ in range(rounds):
            for i, batch in enumerate(batches):
                for mode, run in modes.items():
                    best[mode][i] = np.minimum(best[mode][i], _timed(lambda: run(batch), device))
                for preset in PRESETS:
                    encoder, policy = DToMeEncoder(model, taus[preset]), CountingPolicy(taus[preset])
                    results: list = []
                    elapsed = _timed(lambda: results.extend(encoder.run(batch, policy)), device)
                    best[preset][i] = np.minimum(best[preset][i], elapsed)
                    if round_ == 0:
                        merges[preset].extend(policy.per_image(len(batch)))
                        kept[preset].extend(image.num_tokens for image in results)
    log.info("timed in %.0f s total", time.perf_counter() - started)
    seconds = {mode: times.sum(axis=0) for mode, times in best.items()}  # (wall, cpu) summed over batches
    off_flops = encoder_flops([0] * shape.layers, shape) * images
    off_wall, off_cpu = seconds["off"]
    rows = {}
    for mode in ("stock", "off", *PRESETS):
        wall, cpu = seconds[mode]
        row = {"wall_s": float(wall), "cpu_s": float(cpu), "wall_vs_off": float(wall / off_wall),
               "cpu_vs_off": float(cpu / off_cpu)}
        if mode in PRESETS:
            flops = sum(encoder_flops(m, shape) for m in merges[mode]) / off_flops
            counts = np.array(kept[mode])
            row.update(target=keep[mode], tokens_mean=float(counts.mean()), tokens_std=float(counts.std()),
                       tokens_min=int(counts.min()), tokens_max=int(counts.max()), flops_vs_off=flops,
                       saved_saved_wall=saved_per_saved(row["wall_vs_off"], flops),
                       saved_saved_cpu=saved_per_saved(row["cpu_vs_off"], flops))
        rows[mode] = row
    return {"shape": dataclasses.asdict(shape), "tokens": TOKENS, "images": images, "batch_size": batch_size,
            "rounds": rounds, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads() if device.type == "cpu" else None, "rows": rows}


def saved_per_saved(time_ratio: float, flops_ratio: float) -> float:
    """Time saved / FLOPs saved; NaN when nothing was saved (a preset that merged nothing)."""
    return (1 - time_ratio) / (1 - flops_ratio) if flops_ratio < 1 else float("nan")


def print_table(result: dict) -> None:
    """Markdown table of ``measure``'s result."""
    shape, rows = Shape(**result["shape"]), result["rows"]
    threads = f" ({result['threads']} threads)" if result["threads"] else ""
    print(
        f"\nSigLIP-so400m-shaped encoder, random weights ({shape.layers} layers, width {shape.width}, {shape.heads} "
        f"heads, MLP {shape.mlp}, {IMAGE}px/{PATCH} = {TOKENS} tokens); {result['images']} synthetic images, batch "
        f"{result['batch_size']}, {result['dtype']} on {result['device']}{threads}; best of {result['rounds']} rounds.\n"
        f"off = this runner with every tau at 1.0 (nothing merges); stock = transformers' own forward. "
        f"Saved/saved = time saved / FLOPs saved (target >= 0.85).\n"
    )
    print("| preset | target | tokens kept (mean ± std, min-max) | FLOPs vs off | wall time vs off | CPU time vs off "
          "| saved/saved (wall) | saved/saved (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    stock, off = rows["stock"], rows["off"]
    print(f"| stock | {TOKENS} | {TOKENS} | 1.000 | {stock['wall_vs_off']:.3f} ({stock['wall_s']:.1f} s) "
          f"| {stock['cpu_vs_off']:.3f} ({stock['cpu_s']:.1f} s) | - | - |")
    print(f"| off | {TOKENS} | {TOKENS} | 1.000 | 1.000 ({off['wall_s']:.1f} s) | 1.000 ({off['cpu_s']:.1f} s) | - | - |")
    for preset in PRESETS:
        r = rows[preset]
        print(
            f"| {preset} | {r['target']} | {r['tokens_mean']:.0f} ± {r['tokens_std']:.0f} ({r['tokens_min']}-"
            f"{r['tokens_max']}) | {r['flops_vs_off']:.3f} | {r['wall_vs_off']:.3f} ({r['wall_s']:.1f} s) "
            f"| {r['cpu_vs_off']:.3f} ({r['cpu_s']:.1f} s) | {r['saved_saved_wall']:.2f} | {r['saved_saved_cpu']:.2f} |"
        )


if __name__ == "__main__":
    main()
