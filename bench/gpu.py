"""Every benchmark in one command, for one short run on a CUDA GPU: one JSON file of results.

    python -m bench.gpu --device cuda --dtype bfloat16 --out results.json     # real model shapes (~6 minutes, H200)
    python -m bench.gpu --dry-run --out /tmp/gpu.json                          # tiny shapes on the CPU (a test)
    python -m bench.gpu --device cuda --dtype bfloat16 --out results.json --only serve.flex,e2e.qwen2.5-vl

Sections (each reuses its bench module's own measurement): ``e2e.*`` (bench/e2e.py, every preset on a
LLaVA-OneVision-0.5B and a Qwen2.5-VL-3B-shaped model), ``serve.<backend>.*`` (bench/serve.py: decode tokens/s
at 1/8/32/64 sequences and the engine against ``generate``, 32-frame prompts, the DyRate step, prefix TTFT; with
the engine's ``sdpa`` and ``flex`` decode attention), ``profile.decode`` (where a decode step's time goes),
``encoder.*`` (bench/encoder.py, bench/encoder_qwen.py: time saved / FLOPs saved per preset) and
``encode_batch`` (bench/encode_batch.py --full-size). Random weights, never a download.

A section that fails has its error in the JSON and the next one runs; the file is rewritten after every
section, so a run cut short keeps what it measured; ``--only`` reruns some sections into the same file (the
others are kept); ``--budget-s`` skips what no longer fits (recorded as skipped) and cuts a section that would
run past it. Per section: wall seconds, peak memory (CUDA: ``max_memory_allocated`` since the section began;
CPU: the process's peak RSS so far). The estimates below are GPU seconds on an H200, bf16, setup included.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import resource
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never reach for the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

log = logging.getLogger("bench.gpu")


@dataclass(frozen=True)
class Run:
    """What every section is given: where to run, and whether this is the tiny CPU dry run."""

    device: str
    dtype: str
    dry: bool


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[Run], dict]
    estimate_s: int  # expected GPU seconds (H200, bf16), for the log and the budget's planning


class SectionTimeout(Exception):
    pass


# --- the sections ---------------------------------------------------------------------------------------------
def e2e(family: str) -> Callable[[Run], dict]:
    def run(r: Run) -> dict:
        from bench.e2e import measure, print_table
        from dymu.tiny import TinySizes

        if r.dry:
            result = measure(family, frames=4, answer_tokens=4, presets="off,mid", device=r.device, dtype=r.dtype,
                             sizes=TinySizes())
        else:
            result = measure(family, frames=32, answer_tokens=32, device=r.device, dtype=r.dtype)
        print_table(result)  # the markdown table in the log too (the JSON has the same figures)
        return result
    return run


def serve_args(r: Run, backend: str) -> argparse.Namespace:
    """bench/serve.py's options: its defaults, then the real shapes everywhere (GPU) or tiny ones (dry run)."""
    from bench.serve import build_parser

    if r.dry:
        options = dict(vocab=1024, width=64, heads=4, kv_heads=2, mlp=128, layers=2, batches="1,2", answer_tokens=4, stock_layers=2, stock_frames=2,
                       stock_batch=2, stock_answer_tokens=4, prune_layers=2, prune_seqs=2, prune_frames=2,
                       prune_steps=16, timed_steps=2, prefix_layers=2, prefix_frames=2, pairs=1)
    else:  # Qwen2-0.5B's 24 layers and vocabulary everywhere
        options = dict(layers=24, batches="1,8,32,64", answer_tokens=32, stock_layers=24, stock_frames=32,
                       stock_batch=4, stock_answer_tokens=64, prune_layers=24, prune_seqs=32, prune_frames=32,
                       prune_steps=256, timed_steps=8, prefix_layers=24, prefix_frames=32, pairs=2)
    args = build_parser().parse_args([])
    for name, value in {**options, "device": r.device, "dtype": r.dtype, "attention": backend}.items():
        setattr(args, name, value)
    return args


def serve(part: str, backend: str) -> Callable[[Run], dict]:
    def run(r: Run) -> dict:
        from bench.serve import PARTS

        result = PARTS[part](serve_args(r, backend), torch.device(r.device))
        return {"backend_asked": backend, **result}
    return run


def profile_decode(r: Run) -> dict:
    from bench.serve import profile_decode as measure

    args = serve_args(r, "sdpa")
    return measure(args, torch.device(r.device), sequences=2 if r.dry else 32, steps=2 if r.dry else 5)


def encoder_siglip(r: Run) -> dict:
    from bench.encoder import Shape, measure, print_table

    if r.dry:
        result = measure(images=2, batch_size=2, device=r.device, dtype=r.dtype, rounds=1,
                         shape=Shape(width=64, layers=2, heads=2, mlp=128))
    else:
        result = measure(images=32, batch_size=8, device=r.device, dtype=r.dtype, rounds=3)
    print_table(result)
    return result


def encoder_qwen(r: Run) -> dict:
    from bench.encoder_qwen import run_presets

    if r.dry:
        args = argparse.Namespace(family="qwen2.5-vl", device=r.device, dtype=r.dtype, images=1, rounds=1,
                                  sizes=["448x448"], calibration_images=2, taus_cache=None)
        shape = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14, window_size=112,
                     fullatt_block_indexes=[1], out_hidden_size=64)
        return run_presets(args, shape)
    args = argparse.Namespace(family="qwen2.5-vl", device=r.device, dtype=r.dtype, images=4, rounds=2,
                              sizes=["448x448", "1280x720"], calibration_images=8, taus_cache=None)
    return run_presets(args)


def encode_batch(r: Run) -> dict:
    from bench.encode_batch import FULL, measure, print_table
    from dymu.tiny import TinySizes

    if r.dry:
        result = measure(videos=2, frames=2, batch_frames=[4], rounds=1, device=r.device, dtype=r.dtype,
                         sizes=TinySizes())
    else:
        result = measure(videos=16, frames=4, batch_frames=[4, 16, 64], rounds=3, device=r.device, dtype=r.dtype,
                         sizes=FULL)
    print_table(result)
    return result


# In the order they run: what matters most first, so that a budget cut falls on repeats (flex's other parts).
# Estimates: H200 seconds, setup included.
def _serve_sections(backend: str, parts: str) -> list[Section]:
    table = {"1": ("batches", 35), "2": ("long", 25), "3": ("prune", 30), "4": ("prefix", 10)}
    extra = 20 if backend == "flex" else 0  # flex: its first compile
    return [Section(f"serve.{backend}.{table[p][0]}", serve(p, backend), table[p][1] + extra * (p == "1"))
            for p in parts]


SECTIONS = [
    Section("e2e.llava-onevision", e2e("llava-onevision"), 40),  # 0.9B drawn on the GPU, 4 presets x 32 frames
    *_serve_sections("sdpa", "1234"),  # 1/8/32/64 sequences; 4 x 32-frame prompts; 32 at step 256; prefix
    *_serve_sections("flex", "1"),
    Section("encoder.siglip", encoder_siglip, 20),  # 32 images at 384 px, 5 modes x 3 rounds
    Section("encoder.qwen2.5-vl", encoder_qwen, 35),  # 8 calibration images, 4 per size x 5 modes x 2 rounds
    Section("encode_batch", encode_batch, 30),  # 16 videos x 4 frames, 3 batch sizes x 3 rounds
    Section("e2e.qwen2.5-vl", e2e("qwen2.5-vl"), 75),  # 3.7B drawn on the GPU, 7 GB saved and loaded
    Section("profile.decode", profile_decode, 15),  # 5 decode steps at 32 sequences under torch.profiler
    *_serve_sections("flex", "234"),
]


# --- running them -----------------------------------------------------------------------------------------------
def environment(r: Run) -> dict:
    import numpy
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "numpy": numpy.__version__, "cuda_runtime": torch.version.cuda, "device": r.device, "dtype": r.dtype,
        "dry_run": r.dry, "argv": sys.argv, "host_cpus": os.cpu_count(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for name in ("av", "torchvision", "triton", "tokenizers", "safetensors"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - a missing optional package is a fact to record
            info[name] = f"unavailable: {type(exc).__name__}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=props.total_memory / 2**30,
                    gpu_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
    else:
        info["gpu"] = None
    return info


def peak_memory_start(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib(device: str) -> tuple[float, str]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss_of_process"


def clean(value: Any) -> Any:
    """JSON-ready: tensors and numpy scalars as numbers, NaN/inf as null, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return clean(value.tolist())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a temporary file renamed over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(data), indent=1, allow_nan=False))
    os.replace(tmp, path)


def _alarm(signum, frame):  # noqa: ANN001 - signal handler signature
    raise SectionTimeout


def run_section(section: Section, r: Run, limit_s: float) -> dict:
    """One section, cut at ``limit_s`` seconds: its entry for the JSON (status ok / error)."""
    log.info("section %s: starting (expected ~%d s on an H200, limit %.0f s)", section.name, section.estimate_s,
             limit_s)
    peak_memory_start(r.device)
    started = time.perf_counter()
    entry: dict[str, Any] = {}
    previous = signal.signal(signal.SIGALRM, _alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, max(limit_s, 0.001))  # outer: a caller's own alarm (pytest's)
    try:
        entry["result"] = section.run(r)
        entry["status"] = "ok"
    except SectionTimeout:
        entry.update(status="error", error=f"timed out after {limit_s:.0f} s (budget or --section-timeout-s)")
    except BaseException as exc:  # noqa: BLE001 - record and go on; only Ctrl-C stops the run
        if isinstance(exc, KeyboardInterrupt):
            raise
        entry.update(status="error", error=f"{type(exc).__name__}: {exc}",
                     traceback=traceback.format_exc(limit=-12)[-6000:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.perf_counter() - started), 0.001))
    entry["seconds"] = time.perf_counter() - started
    try:
        entry["peak_memory_mib"], entry["peak_memory_kind"] = peak_memory_mib(r.device)
    except Exception as exc:  # noqa: BLE001 - a broken CUDA context after a failed section
        entry["peak_memory_mib"], entry["peak_memory_kind"] = None, f"unavailable: {exc}"
    gc.collect()
    if r.device.startswith("cuda"):
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
    log.info("section %s: %s in %.1f s%s", section.name, entry["status"], entry["seconds"],
             f" ({entry['error']})" if "error" in entry else "")
    return entry


def run_sections(sections: list[Section], r: Run, out: Path, data: dict, budget_s: float,
                 section_timeout_s: float) -> dict:
    """Run ``sections`` in turn into ``data["sections"]``, writing ``out`` after each one."""
    started = time.perf_counter()
    for section in sections:
        left = budget_s - (time.perf_counter() - started)
        if left <= 0:
            data["sections"][section.name] = {"status": "skipped", "reason": f"the {budget_s:.0f} s budget ran out"}
            log.info("section %s: skipped (budget spent)", section.name)
        else:
            data["sections"][section.name] = run_section(section, r, min(left, section_timeout_s))
        data["total_seconds"] = time.perf_counter() - started
        write_json(out, data)
    return data


def select(names: str | None) -> list[Section]:
    """The sections ``names`` (comma-separated; a prefix such as ``serve.flex`` or ``e2e`` names all below it)."""
    if not names:
        return list(SECTIONS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if not any(s.name == n or s.name.startswith(n + ".") for s in SECTIONS)]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(s.name for s in SECTIONS)}")
    return [s for s in SECTIONS if any(s.name == n or s.name.startswith(n + ".") for n in wanted)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", default="results.json", help="the JSON file (rewritten after every section)")
    parser.add_argument("--only", default=None, help="comma-separated sections (or prefixes) to run; the others "
                                                     "already in --out are kept")
    parser.add_argument("--budget-s", type=float, default=390.0, help="seconds for all sections; later ones are "
                                                                      "skipped, a running one is cut (default 390)")
    parser.add_argument("--section-timeout-s", type=float, default=150.0, help="the most one section may take")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, few steps, CPU, float32: a test")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--list", action="store_true", help="print the section names and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr, force=True)
    if args.list:
        print("\n".join(f"{s.name} (~{s.estimate_s} s)" for s in SECTIONS))
        return 0
    try:
        sections = select(args.only)
    except ValueError as exc:
        print(f"bench.gpu: {exc}", file=sys.stderr)
        return 2
    r = Run("cpu", "float32", True) if args.dry_run else Run(args.device, args.dtype, False)
    if r.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench.gpu: --device cuda but torch sees no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    data: dict[str, Any] = {"sections": {}}
    if args.only and out.is_file():  # a rerun of some sections: keep the others' results
        try:
            data = json.loads(out.read_text())
            data.setdefault("sections", {})
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("could not read %s (%s); starting a new file", out, exc)
    data["environment"] = environment(r)
    log.info("bench.gpu: %d section(s) on %s %s (%s); budget %.0f s; out %s", len(sections), r.device, r.dtype,
             data["environment"]["gpu"] or "no GPU", args.budget_s, out)
    write_json(out, data)
    run_sections(sections, r, out, data, args.budget_s, args.section_timeout_s)
    failed = [name for name in (s.name for s in sections) if data["sections"][name]["status"] != "ok"]
    log.info("bench.gpu: done in %.0f s; %s; wrote %s", data["total_seconds"],
             f"not ok: {', '.join(failed)}" if failed else "all ok", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
