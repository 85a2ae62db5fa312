"""Benchmark: DToMe in a Qwen2.5-VL-7B-shaped (or Qwen3-VL-8B-shaped) vision encoder, random weights.

Run through ``bench/encoder.py --family qwen2.5-vl`` (or ``qwen3-vl``). Thresholds are calibrated per preset
on synthetic 448x448 images (flat, gradient, texture, natural-ish; as `dymu-video calibrate` does), then
applied at 448x448 and 1280x720 (the processor's dynamic resolution: 448x448 and 1288x728). Per preset:
merger tokens kept, FLOPs against off (every linear layer's rows and every attention segment's length,
counted as they run), wall and CPU time against off, and time saved / FLOPs saved (target >= 0.85).
"off" is this runner with every threshold at 1.0; "stock" is transformers' own forward, for reference.

``--compare`` measures the two design choices on the same images at ``mid``: merging whole 2x2 merger
groups vs single patches (+ one merger call per distinct 4-tuple), and one rotation per merged row (its
mean position) vs the exact form (every patch rotated by its own position, attention at full length).
Deviation is of what the LLM reads at each merger cell, against off: 1 - cosine, and the relative L2 error.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dymu.calibrate import calibrate, preset_keep
from dymu.families.base import resolve_device_dtype
from dymu.vision import qwen_vl
from dymu.vision.qwen_inputs import QwenVisualInput
from dymu.vision.qwen_model import CALIBRATION_SIDE, QwenFrameEncoder
from dymu.vision.qwen_vl import QwenDToMeEncoder

try:  # python -m bench.encoder
    from bench.encoder import _timed, saved_per_saved
except ImportError:  # python bench/encoder.py: bench/ is the script's folder
    from encoder import _timed, saved_per_saved

log = logging.getLogger("bench.encoder_qwen")

PRESETS = ("low", "mid", "high")
SHAPES = {
    # Qwen2.5-VL-7B's vision encoder (3B's is the same but for the output width).
    "qwen2.5-vl": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584),
    # Qwen3-VL-8B's.
    "qwen3-vl": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                     deepstack_visual_indexes=[8, 16, 24], out_hidden_size=4096, num_position_embeddings=2304),
}
SIZES = {"448x448": (448, 448), "1280x720": (720, 1280)}


def build_visual(family: str, device: torch.device, dtype: torch.dtype, shape: dict | None = None) -> nn.Module:
    """The vision model (``shape``: config values instead of ``SHAPES[family]``), built on the meta device and
    initialised here (transformers' init is slow on CPU)."""
    from transformers import Qwen2_5_VLVisionConfig, Qwen3VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    if family == "qwen2.5-vl":
        config, cls = Qwen2_5_VLVisionConfig(**(shape or SHAPES[family])), Qwen2_5_VisionTransformerPretrainedModel
    else:
        config, cls = Qwen3VLVisionConfig(**(shape or SHAPES[family])), Qwen3VLVisionModel
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv3d)):
                nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=config.hidden_size**-0.5)
            elif hasattr(module, "weight") and isinstance(getattr(module, "weight"), nn.Parameter):
                nn.init.ones_(module.weight)  # RMSNorm / LayerNorm
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        rotary = model.rotary_pos_emb
        inv_freq, _ = rotary.compute_axial_rope_parameters(config)
        rotary.inv_freq.copy_(inv_freq.to(device))
    return model.to(dtype).eval()


def synthetic_frames(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """uint8 RGB frames cycling through busy texture, natural-ish (1/f-like), flat and gradient."""
    rng = np.random.default_rng(seed)

    def smooth(cells: int) -> np.ndarray:
        noise = torch.from_numpy(rng.normal(size=(1, 3, cells, max(1, cells * width // height)))).float()
        return F.interpolate(noise, size=(height, width), mode="bicubic")[0].numpy()

    ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    frames = []
    for i in range(count):
        kind = (i + 2) % 4  # busy ones first, so that a short run is not all flat
        if kind == 0:
            image = np.broadcast_to(rng.uniform(-1, 1, (3, 1, 1)), (3, height, width))
        elif kind == 1:
            angle = rng.uniform(0, 2 * math.pi)
            t = (math.cos(angle) * ys + math.sin(angle) * xs) / 2 + 0.5
            a, b = rng.uniform(-1, 1, (3, 1, 1)), rng.uniform(-1, 1, (3, 1, 1))
            image = a * (1 - t) + b * t
        elif kind == 2:
            stripes = np.sin(xs * rng.uniform(20, 60) + ys * rng.uniform(0, 30))
            image = 0.5 * stripes[None] + 0.5 * smooth(96)
        else:
            image = sum(smooth(cells) / cells**0.8 for cells in (2, 4, 8, 16, 32, 64))
            image = image / np.abs(image).max()
        frames.append(((np.clip(image, -1, 1).transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8))
    return frames


def processor_for(family: str):
    from transformers import Qwen2VLImageProcessor

    patch = SHAPES[family]["patch_size"]
    mean = [0.48145466, 0.4578275, 0.40821073] if family == "qwen2.5-vl" else [0.5] * 3
    std = [0.26862954, 0.26130258, 0.27577711] if family == "qwen2.5-vl" else [0.5] * 3
    return Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384},
                                 patch_size=patch, temporal_patch_size=2, merge_size=2, image_mean=mean, image_std=std)


def inputs_of(processor, frames: list[np.ndarray], device, dtype) -> QwenVisualInput:
    out = processor(images=frames, return_tensors="pt")
    return QwenVisualInput(out["pixel_values"].to(device, dtype), out["image_grid_thw"])


class FlopCounter:
    """FLOPs as they run: 2 * rows * in * out for every linear layer, 4 * len^2 * width for every attention
    segment (the runner's segments; for the stock forward, its windows / slots)."""

    def __init__(self, visual: nn.Module):
        self.visual, self.flops, self.handles = visual, 0.0, []
        self.width = visual.config.hidden_size

    def __enter__(self) -> "FlopCounter":
        def linear(module, args, _out):
            rows = args[0].numel() // args[0].shape[-1]
            self.flops += 2 * rows * module.in_features * module.out_features

        def conv(module, args, _out):
            self.flops += 2 * args[0].shape[0] * module.weight.numel()

        for module in self.visual.modules():
            if isinstance(module, nn.Linear):
                self.handles.append(module.register_forward_hook(linear))
            elif isinstance(module, nn.Conv3d):
                self.handles.append(module.register_forward_hook(conv))
        self._original = qwen_vl._segment_attention

        def counted(q, k, v, key_sizes, lengths, scale):
            self.flops += 4 * sum(n * n for n in lengths) * q.shape[1] * q.shape[2]
            return self._original(q, k, v, key_sizes, lengths, scale)

        qwen_vl._segment_attention = counted
        return self

    def __exit__(self, *exc) -> None:
        qwen_vl._segment_attention = self._original
        for handle in self.handles:
            handle.remove()


def calibrated(visual, family, processor, device, dtype, images: int, grouping: str = "group",
               rotary: str = "mean", presets=PRESETS, cache: str | None = None) -> dict[str, list[float]]:
    """Thresholds per preset; with ``cache``, read from / written to that JSON file (same seed, same weights:
    a second run need not calibrate again)."""
    key = f"{family}/{grouping}/{rotary}/{images}/{str(dtype)}"
    stored = json.loads(Path(cache).read_text()) if cache and Path(cache).exists() else {}
    if all(f"{key}/{p}" in stored for p in presets):
        return {p: stored[f"{key}/{p}"] for p in presets}
    frames = synthetic_frames(images, CALIBRATION_SIDE, CALIBRATION_SIDE, seed=1)
    batches = [inputs_of(processor, frames[i:i + 2], device, dtype) for i in range(0, len(frames), 2)]
    encoder = QwenFrameEncoder(visual, grouping=grouping, rotary=rotary)
    taus = {p: calibrate(encoder, batches, preset_keep(p, encoder.num_positions)) for p in presets}
    if cache:
        stored.update({f"{key}/{p}": t for p, t in taus.items()})
        Path(cache).write_text(json.dumps(stored))
    return taus


def run_presets(args, shape: dict | None = None) -> dict:
    """Calibrate and time every preset at each of ``args.sizes``; prints the table and returns its figures.
    ``shape``: the encoder's config values instead of ``SHAPES[args.family]`` (a quick run)."""
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    torch.manual_seed(0)
    started = time.perf_counter()
    visual = build_visual(args.family, device, dtype, shape)
    processor = processor_for(args.family)
    taus = calibrated(visual, args.family, processor, device, dtype, args.calibration_images, cache=args.taus_cache)
    log.info("built and calibrated in %.0f s: %s", time.perf_counter() - started,
             {p: [round(t, 3) for t in v[:4]] for p, v in taus.items()})
    shape = shape or SHAPES[args.family]
    out = {"family": args.family, "shape": shape, "images": args.images, "rounds": args.rounds,
           "calibration_images": args.calibration_images, "device": str(device),
           "dtype": str(dtype).removeprefix("torch."), "sizes": {}}
    print(f"\n{args.family} vision encoder, random weights (depth {shape['depth']}, width {shape['hidden_size']}, "
          f"{shape['num_heads']} heads, patch {shape['patch_size']}); {args.images} synthetic images per size, one "
          f"at a time; {str(dtype).removeprefix('torch.')} on {device}"
          f"{f' ({torch.get_num_threads()} threads)' if device.type == 'cpu' else ''}; best of {args.rounds} rounds. "
          f"Thresholds calibrated on {args.calibration_images} images at 448x448.\n")
    print("| size | preset | merger tokens kept (mean, min-max of N) | FLOPs vs off | wall vs off | CPU vs off "
          "| saved/saved (wall) | saved/saved (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for size_name, (height, width) in SIZES.items():
        if size_name not in args.sizes:
            continue
        images = [inputs_of(processor, [frame], device, dtype)
                  for frame in synthetic_frames(args.images, height, width, seed=2)]
        modes = {"stock": None, "off": [1.0] * shape["depth"], **{p: taus[p] for p in PRESETS}}
        best = {mode: np.full((len(images), 2), np.inf) for mode in modes}
        flops, kept = defaultdict(float), defaultdict(list)
        for round_ in range(args.rounds):
            for i, item in enumerate(images):
                # Each round starts at another mode: a run times a little differently after a run that allocated
                # differently (up to 5% here), so no mode always follows the same neighbour.
                names = list(modes)
                names = names[round_ % len(names):] + names[:round_ % len(names)]
                for mode, mode_taus in ((name, modes[name]) for name in names):
                    if mode == "stock":
                        def run():
                            with torch.no_grad():
                                return visual(item.pixel_values, grid_thw=item.grid_thw.to(device))
                    else:
                        encoder = QwenDToMeEncoder(visual, taus=mode_taus)

                        def run():
                            return encoder(item.pixel_values, item.grid_thw)
                    if mode == "stock":
                        best[mode][i] = np.minimum(best[mode][i], _timed(run, device))
                        continue
                    # Every DToMe mode runs with the FLOP counter's hooks on (the same small overhead for all).
                    with FlopCounter(visual) as counter:
                        results = []
                        best[mode][i] = np.minimum(best[mode][i], _timed(lambda: results.extend(run()), device))
                    if round_ == 0:
                        flops[mode] += counter.flops
                        kept[mode].append((results[0].num_unique, results[0].num_positions))
        seconds = {mode: times.sum(axis=0) for mode, times in best.items()}
        off_wall, off_cpu = seconds["off"]
        cells = kept["off"][0][1]
        rows = out["sizes"][size_name] = {"cells": cells}
        for mode in modes:
            rows[mode] = {"wall_s": float(seconds[mode][0]), "cpu_s": float(seconds[mode][1]),
                          "wall_vs_off": float(seconds[mode][0] / off_wall), "cpu_vs_off": float(seconds[mode][1] / off_cpu)}
        for preset in PRESETS:
            ratio = flops[preset] / flops["off"]
            counts = np.array([k for k, _ in kept[preset]])
            rows[preset].update(flops_vs_off=ratio, tokens_mean=float(counts.mean()), tokens_min=int(counts.min()),
                                tokens_max=int(counts.max()),
                                saved_saved_wall=saved_per_saved(rows[preset]["wall_vs_off"], ratio),
                                saved_saved_cpu=saved_per_saved(rows[preset]["cpu_vs_off"], ratio))
        print(f"| {size_name} | stock | {cells} | - | {seconds['stock'][0] / off_wall:.3f} "
              f"| {seconds['stock'][1] / off_cpu:.3f} | - | - |")
        print(f"| {size_name} | off | {cells} | 1.000 | 1.000 ({off_wall:.1f} s) | 1.000 ({off_cpu:.1f} s) | - | - |")
        for preset in PRESETS:
            ratio = flops[preset] / flops["off"]
            wall, cpu = seconds[preset][0] / off_wall, seconds[preset][1] / off_cpu
            counts = np.array([k for k, _ in kept[preset]])
            print(f"| {size_name} | {preset} | {counts.mean():.0f} ({counts.min()}-{counts.max()} of {cells}) "
                  f"| {ratio:.3f} | {wall:.3f} | {cpu:.3f} | {rows[preset]['saved_saved_wall']:.2f} "
                  f"| {rows[preset]['saved_saved_cpu']:.2f} |")
    return out


def run_compare(args) -> None:
    """Grouping x rotary at one preset, on the same images: tokens, FLOPs, time, deviation from off."""
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    torch.manual_seed(0)
    visual = build_visual(args.family, device, dtype)
    processor = processor_for(args.family)
    height, width = SIZES[args.sizes[0]]
    images = [inputs_of(processor, [f], device, dtype) for f in synthetic_frames(args.images, height, width, seed=2)]
    off = QwenDToMeEncoder(visual)
    reference = [off(item.pixel_values, item.grid_thw)[0] for item in images]
    off_flops = 0.0
    with FlopCounter(visual) as counter:
        for item in images:
            off(item.pixel_values, item.grid_thw)
    off_flops = counter.flops
    off_cpu = sum(_timed(lambda: off(item.pixel_values, item.grid_thw), device)[1] for item in images)
    print(f"\n{args.family}, preset {args.preset}, {args.images} synthetic images at {args.sizes[0]}, "
          f"{str(dtype).removeprefix('torch.')} on {device}; deviation of the feature each merger cell reads, vs off.\n")
    print("| grouping | rotary | merger tokens kept (mean) | FLOPs vs off | CPU time vs off | 1 - cosine (mean) "
          "| relative L2 error |")
    print("|---|---|---|---|---|---|---|")
    for grouping in qwen_vl.GROUPINGS:
        taus = calibrated(visual, args.family, processor, device, dtype, args.calibration_images, grouping,
                          presets=(args.preset,), cache=args.taus_cache)[args.preset]
        for rotary in qwen_vl.ROTARY_FORMS:
            encoder = QwenDToMeEncoder(visual, taus=taus, grouping=grouping, rotary=rotary)
            with FlopCounter(visual) as counter:
                results = [encoder(item.pixel_values, item.grid_thw)[0] for item in images]
            cpu = min(sum(_timed(lambda: encoder(item.pixel_values, item.grid_thw), device)[1] for item in images)
                      for _ in range(args.rounds))
            log.info("%s/%s done", grouping, rotary)
            cos, rel = [], []
            for merged, ref in zip(results, reference):
                got, want = merged.embeds[merged.mapping].float(), ref.embeds.float()
                cos.append(float(1 - F.cosine_similarity(got, want, dim=-1).mean()))
                rel.append(float((got - want).norm() / want.norm()))
            kept = np.mean([r.num_unique for r in results])
            print(f"| {grouping} | {rotary} | {kept:.0f} of {reference[0].num_positions} "
                  f"| {counter.flops / off_flops:.3f} | {cpu / off_cpu:.3f} | {np.mean(cos):.4f} | {np.mean(rel):.3f} |")
