"""Benchmark the batched engine (dymu.engine) in one run, on a Qwen2-0.5B-shaped random decoder with the
real 151936-token vocabulary. Video prompts are those of bench/llm.py: frames x 196 visual positions
between ~32 text tokens, merged to 25% of the rows (2 x 2 neighbouring cells) or left unmerged ("off").

1. decode tokens/s with 1, 4, 8, 16 sequences running, against 1; at "off", whole requests/s of the engine
   against transformers' ``generate`` on the same batch (all prompts the same length: no padding), as the
   median of paired ratios (engine, generate, engine merged, ... interleaved, so that load shared by the
   machine falls on both alike); the merged prompts through the engine against the same stock batch;
2. the same pairing on long prompts (``--stock-frames``, 32 by default) with long answers: merged rows
   through the engine against ``generate`` on the unmerged batch;
3. DyRate in the batch: decode step time at step ``--prune-steps`` with ``--prune-seqs`` sequences of
   ``--prune-frames`` frames, the schedule's pruning (to 10% of the visual entries) against none, on a KV
   filled synthetically (bench/serve_kv.py); KV bytes really freed; sequences admitted at that step under
   one fixed ``kv_cache_gb``;
4. time to first token of a second question about the same video (visual-prefix hit) against the first;
5. peak memory.

    python -m bench.serve --threads 1          # 4 layers for 1. and 4., 2 for 2., 24 for 3. (synthetic)
    python -m bench.serve --layers 24 --stock-layers 24 --prefix-layers 24   # the full shape everywhere
    python -m bench.serve --device cuda --dtype bfloat16 --layers 24 --stock-layers 24 --prefix-layers 24

Ratios within one run are what to read; seconds on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import time

import torch

from bench.llm import build_model, video_prompt
from bench.serve_kv import admit_at_step, time_steps
from dymu.engine import Engine, EngineConfig
from dymu.engine.block_manager import block_bytes
from dymu.llm import GenerateConfig, LinearSchedule, PruneConfig, VirtualSequence

log = logging.getLogger("bench.serve")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(model, prompts: list[VirtualSequence], config: GenerateConfig, engine_config: EngineConfig,
               predictor=None) -> dict:
    """Answer ``prompts`` together; return wall seconds, step times with every sequence decoding, stats."""
    engine = Engine(model, None, engine_config)
    device = engine.decoder.device
    sync(device)
    started = time.perf_counter()
    for prompt in prompts:
        engine.add_request(prompt, config, predictor=predictor)
    decode_steps = []
    while engine.has_unfinished():
        before = engine.stats()
        step_started = time.perf_counter()
        engine.step()
        sync(device)
        if before["prefilling"] == 0 and before["waiting"] == 0 and before["decoding"] == len(prompts):
            decode_steps.append(time.perf_counter() - step_started)
    return {"seconds": time.perf_counter() - started, "decode_steps": decode_steps, "stats": engine.stats(),
            "attention": engine.attention.name}


def stock_generate(model, prompts: list[VirtualSequence], tokens: int) -> dict:
    """transformers' generate on the batch of (unmerged, equal-length) prompts; return its wall seconds."""
    embeds = torch.stack([p.rows for p in prompts])
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    sync(embeds.device)
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, pad_token_id=0)
    sync(embeds.device)
    return {"seconds": time.perf_counter() - started}


def prompts_for(model, count: int, frames: int, text_tokens: int, merged: bool, device) -> list[VirtualSequence]:
    out = []
    for i in range(count):
        unmerged_prompt, merged_prompt = video_prompt(model, frames, text_tokens, seed=i)
        out.append((merged_prompt if merged else unmerged_prompt).to(device, model.dtype))
    return out


def kv_gb_for(model, sequences: int, entries: int, block_size: int) -> float:
    """A pool that holds ``sequences`` x ``entries`` entries in every layer."""
    c = model.config
    blocks = sequences * c.num_hidden_layers * (-(-entries // block_size) + 1)
    return blocks * block_bytes(block_size, c.num_key_value_heads, c.hidden_size // c.num_attention_heads,
                                model.dtype) / 2**30


def paired(pairs: int, runs: dict) -> dict[str, list[dict]]:
    """Each of ``runs`` (name -> thunk) once per pair, in turn: A B C A B C ..."""
    out: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(pairs):
        for name, run in runs.items():
            out[name].append(run())
    return out


def median_ratio(slow: list[dict], fast: list[dict]) -> float:
    """The median over pairs of slow seconds / fast seconds (> 1: ``fast`` is faster)."""
    return statistics.median(a["seconds"] / b["seconds"] for a, b in zip(slow, fast))


def uptime() -> str:
    return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def model_with(args: argparse.Namespace, layers: int):
    return build_model(argparse.Namespace(**{**vars(args), "layers": layers}))


def engine_config(args: argparse.Namespace, **sizes) -> EngineConfig:
    """An EngineConfig of ``sizes`` with the run's decode attention backend (``--attention``)."""
    return EngineConfig(attention=getattr(args, "attention", "auto"), **sizes)


def weight_bytes(model) -> int:
    """Bytes of the decoder's weights: what one decode step reads at least once, whatever the batch."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def batch_table(args: argparse.Namespace, device: torch.device) -> dict:
    model = model_with(args, args.layers)
    out = {"layers": args.layers, "frames": args.frames, "answer_tokens": args.answer_tokens, "pairs": args.pairs,
           "weight_bytes": weight_bytes(model), "rows": []}
    batches = [int(b) for b in args.batches.split(",")]
    answer = GenerateConfig(max_new_tokens=args.answer_tokens)
    entries = args.frames * 196 + args.text_tokens + args.answer_tokens
    print(f"\n## 1. Batches: {args.layers}-layer decoder; {args.frames} frame(s) x 196 visual positions + "
          f"{args.text_tokens} text tokens, merged to 25% of the rows or 'off'; {args.answer_tokens}-token answers; "
          f"median of {args.pairs} interleaved pairs ({uptime()} at the start)\n")
    print("| running | decode tok/s off (best step) | vs 1 | decode tok/s 25% | vs 1 | engine off / generate | "
          "engine 25% / generate | load |")
    print("|---|---|---|---|---|---|---|---|")
    singles: dict[bool, float] = {}
    for batch in batches:
        sizes = engine_config(args, kv_cache_gb=kv_gb_for(model, batch, entries, 16), max_batch=batch,
                              prefill_chunk=batch * entries)
        off = prompts_for(model, batch, args.frames, args.text_tokens, False, device)
        merged = prompts_for(model, batch, args.frames, args.text_tokens, True, device)
        run_engine(model, off[:1], GenerateConfig(max_new_tokens=2), sizes)  # warm-up
        runs = paired(args.pairs, {
            "off": lambda: run_engine(model, off, answer, sizes),
            "generate": lambda: stock_generate(model, off, args.answer_tokens),
            "merged": lambda: run_engine(model, merged, answer, sizes),
        })
        rates = {}
        for name in ("off", "merged"):
            steps = [s for out in runs[name] for s in out["decode_steps"]]
            rates[name] = batch / min(steps) if steps else float("nan")
            if batch == 1:
                singles[name] = rates[name]
        vs = {name: rates[name] / singles[name] if name in singles else float("nan") for name in rates}
        row = {"running": batch, "decode_tok_s_off": rates["off"], "off_vs_1": vs["off"],
               "decode_tok_s_merged": rates["merged"], "merged_vs_1": vs["merged"],
               "engine_off_vs_generate": median_ratio(runs["generate"], runs["off"]),
               "engine_merged_vs_generate": median_ratio(runs["generate"], runs["merged"]),
               "seconds": {name: [r["seconds"] for r in results] for name, results in runs.items()},
               "attention": runs["off"][0]["attention"]}
        out["rows"].append(row)
        print(f"| {batch} | {rates['off']:.1f} | {vs['off']:.2f}x | {rates['merged']:.1f} | {vs['merged']:.2f}x | "
              f"{row['engine_off_vs_generate']:.2f}x | {row['engine_merged_vs_generate']:.2f}x | "
              f"{os.getloadavg()[0]:.1f} |", flush=True)
    return out


def long_prompt_ratio(args: argparse.Namespace, device: torch.device) -> dict:
    model = model_with(args, args.stock_layers)
    batch, tokens = args.stock_batch, args.stock_answer_tokens
    entries = args.stock_frames * 196 + args.text_tokens + tokens
    sizes = engine_config(args, kv_cache_gb=kv_gb_for(model, batch, entries, 16), max_batch=batch,
                          prefill_chunk=batch * entries)
    off = prompts_for(model, batch, args.stock_frames, args.text_tokens, False, device)
    merged = prompts_for(model, batch, args.stock_frames, args.text_tokens, True, device)
    answer = GenerateConfig(max_new_tokens=tokens)
    print(f"\n## 2. Long prompts: {args.stock_layers}-layer decoder, {batch} prompts of {args.stock_frames} frames "
          f"({off[0].num_positions} positions), {tokens}-token answers; median of {args.pairs} interleaved pairs "
          f"({uptime()} at the start)\n")
    runs = paired(args.pairs, {
        "generate": lambda: stock_generate(model, off, tokens),
        "merged": lambda: run_engine(model, merged, answer, sizes),
        "off": lambda: run_engine(model, off, answer, sizes),
    })
    print("| | seconds per pair | vs `generate` (median of paired ratios) |")
    print("|---|---|---|")
    out = {"layers": args.stock_layers, "batch": batch, "frames": args.stock_frames, "positions": off[0].num_positions,
           "answer_tokens": tokens, "pairs": args.pairs, "attention": runs["off"][0]["attention"], "rows": {}}
    for name, label in (("generate", "`generate`, unmerged"), ("off", "engine, off"), ("merged", "engine, 25% (VTU)")):
        seconds = ", ".join(f"{run['seconds']:.0f}" for run in runs[name])
        ratio = median_ratio(runs["generate"], runs[name])
        out["rows"][name] = {"seconds": [run["seconds"] for run in runs[name]], "vs_generate": ratio}
        print(f"| {label} | {seconds} | {ratio:.2f}x |")
    print(f"\n(at the end: {uptime()})")
    return out


def prune_table(args: argparse.Namespace, device: torch.device) -> dict:
    model = model_with(args, args.prune_layers)
    probe = args.prune_layer if args.prune_layer is not None else (2 if args.prune_layers >= 8 else 0)
    steps, seqs = args.prune_steps, args.prune_seqs
    prompt = prompts_for(model, 1, args.prune_frames, args.text_tokens, True, device)[0]
    entries = prompt.num_positions + steps + args.timed_steps
    prune = PruneConfig(enabled=True, layer=probe, start_step=8, interval=8, min_keep=0.1)
    schedule = LinearSchedule(start=8, end=max(steps // 2, 9), final=0.1)
    configs = {"unpruned": (GenerateConfig(max_new_tokens=entries), None),
               "pruned": (GenerateConfig(max_new_tokens=entries, prune=prune), schedule)}
    print(f"\n## 3. DyRate in the batch: {args.prune_layers}-layer decoder, {seqs} sequences of {args.prune_frames} "
          f"frames ({prompt.num_positions} positions, merged to 25% of the rows), decode steps {steps}-"
          f"{steps + args.timed_steps - 1}; KV of the prompt and the first {steps - 1} steps filled synthetically, "
          f"the linear schedule's pruning to 10% of the visual entries after layer {probe} ({uptime()})\n")
    times: dict[str, list[list[float]]] = {name: [] for name in configs}
    freed: dict[str, int] = {}
    for _ in range(args.pairs):
        for name, (config, predictor) in configs.items():
            engine = Engine(model, None, engine_config(args, kv_cache_gb=kv_gb_for(model, seqs, entries, 16),
                                                       max_batch=seqs))
            for _ in range(seqs):
                engine.add_request(prompt, config, predictor=predictor)
            admitted = admit_at_step(engine, steps, probe, 0.1 if predictor else None, seed=args.seed)
            assert admitted == seqs, f"{admitted} of {seqs} admitted"
            freed[name] = sum(r.kv.blocks_freed_by_pruning for r in engine.scheduler.running) * engine.pool.block_bytes
            in_use = engine.stats()["kv_bytes_in_use"]
            times[name].append(time_steps(engine, args.timed_steps))
            freed[name + " in use"] = in_use
            attention = engine.attention.name
            del engine
    per_pair = [statistics.median(p) / statistics.median(u) for p, u in zip(times["pruned"], times["unpruned"])]
    # Admission under one pool that holds half the sequences unpruned at that step.
    fixed_gb = kv_gb_for(model, max(seqs // 2, 1), prompt.num_positions + steps, 16)
    admitted = {}
    for name, (config, predictor) in configs.items():
        engine = Engine(model, None, engine_config(args, kv_cache_gb=fixed_gb, max_batch=4 * seqs))
        for _ in range(4 * seqs):
            engine.add_request(prompt, config, predictor=predictor)
        admitted[name] = admit_at_step(engine, steps, probe, 0.1 if predictor else None, seed=args.seed)
        del engine
    print(f"| | decode step ms (median of steps {steps}-{steps + args.timed_steps - 1}, per pair) | pruned / unpruned "
          f"(median of paired ratios) | KV in use MiB | KV freed by pruning MiB | sequences at step {steps} under "
          f"{fixed_gb * 1024:.0f} MiB |")
    print("|---|---|---|---|---|---|")
    out = {"layers": args.prune_layers, "sequences": seqs, "frames": args.prune_frames, "step": steps,
           "positions": prompt.num_positions, "attention": attention, "fixed_pool_mib": fixed_gb * 1024,
           "pruned_vs_unpruned": statistics.median(per_pair), "rows": {}}
    for name in configs:
        ms = ", ".join(f"{1000 * statistics.median(t):.0f}" for t in times[name])
        ratio = f"{statistics.median(per_pair):.2f}" if name == "pruned" else "1.00"
        out["rows"][name] = {"step_ms": [1000 * statistics.median(t) for t in times[name]],
                             "kv_in_use_mib": freed[name + " in use"] / 2**20, "kv_freed_mib": freed[name] / 2**20,
                             "admitted_under_fixed_pool": admitted[name]}
        print(f"| {name} | {ms} | {ratio} | {freed[name + ' in use'] / 2**20:.0f} | {freed[name] / 2**20:.0f} | "
              f"{admitted[name]} |")
    print(f"\n(at the end: {uptime()})")
    return out


def prefix_ttft(args: argparse.Namespace, device: torch.device) -> dict:
    model = model_with(args, args.prefix_layers)
    _, video = video_prompt(model, args.prefix_frames, args.text_tokens, seed=99)
    video = video.to(device, model.dtype)
    before, after = args.text_tokens // 2, args.text_tokens - args.text_tokens // 2
    prefix = before + args.prefix_frames * 196
    # A second question: the same video, other words after it.
    rows = video.rows.clone()
    rows[-after:] = (torch.randn(after, rows.shape[1], generator=torch.Generator().manual_seed(7)).to(rows)
                     * rows.std())
    second = VirtualSequence(rows, video.mapping, video.visual)
    sizes = engine_config(args, kv_cache_gb=kv_gb_for(model, 3, video.num_positions + 64, 16),
                          prefix_cache_gb=kv_gb_for(model, 1, prefix, 16), prefill_chunk=video.num_positions)
    run_engine(model, [second], GenerateConfig(max_new_tokens=1), sizes)  # warm-up
    ratios, firsts, seconds = [], [], []
    for _ in range(args.pairs):
        engine = Engine(model, None, sizes)
        ttft = []
        for question in (video, second):
            sync(device)
            started = time.perf_counter()
            engine.add_request(question, GenerateConfig(max_new_tokens=1), prefix_key="video", prefix_positions=prefix)
            engine.run()
            sync(device)
            ttft.append(time.perf_counter() - started)
        assert engine.stats()["prefix_hits"] == 1
        firsts.append(ttft[0]), seconds.append(ttft[1]), ratios.append(ttft[0] / ttft[1])
    print(f"\n## 4. Visual-prefix reuse: {args.prefix_layers}-layer decoder, {args.prefix_frames}-frame video "
          f"({video.num_positions} positions, merged to 25% of the rows; prefix {prefix} positions)\n")
    print(f"Time to first token: first question {', '.join(f'{s:.2f}' for s in firsts)} s, second (prefix hit) "
          f"{', '.join(f'{s:.3f}' for s in seconds)} s; median of paired ratios {statistics.median(ratios):.0f}x "
          f"({uptime()}).")
    return {"layers": args.prefix_layers, "frames": args.prefix_frames, "positions": video.num_positions,
            "prefix_positions": prefix, "attention": engine.attention.name, "first_s": firsts, "second_s": seconds,
            "first_vs_second": statistics.median(ratios)}


def profile_decode(args: argparse.Namespace, device: torch.device, sequences: int = 32, steps: int = 5) -> dict:
    """Where a decode step's time goes: ``steps`` engine steps with ``sequences`` merged 1-frame prompts decoding
    (``--layers``), timed plainly, then again under torch.profiler; the top operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    model = model_with(args, args.layers)
    tokens = args.answer_tokens + 2 * steps + 8  # no sequence finishes while timed
    entries = args.frames * 196 + args.text_tokens + tokens
    engine = Engine(model, None, engine_config(args, kv_cache_gb=kv_gb_for(model, sequences, entries, 16),
                                               max_batch=sequences, prefill_chunk=sequences * entries))
    for prompt in prompts_for(model, sequences, args.frames, args.text_tokens, True, device):
        engine.add_request(prompt, GenerateConfig(max_new_tokens=tokens))
    while (stats := engine.stats())["decoding"] < sequences or stats["prefilling"] or stats["waiting"]:
        engine.step()
    time_steps(engine, 3)  # warm-up (a compiled backend compiles here)
    plain = time_steps(engine, steps)
    on_gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        time_steps(engine, steps)
    events = prof.key_averages()

    def self_device_us(event) -> float:  # the attribute's name changed across PyTorch releases
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)) or 0.0)

    key = self_device_us if on_gpu else (lambda event: float(event.self_cpu_time_total))
    top = sorted(events, key=key, reverse=True)[:15]
    result = {
        "sequences": sequences, "layers": args.layers, "steps": steps, "attention": engine.attention.name,
        "weight_bytes": weight_bytes(model), "step_ms_plain": [1000 * t for t in plain],
        "step_ms_median": 1000 * statistics.median(plain),
        "self_cpu_ms_per_step": sum(e.self_cpu_time_total for e in events) / 1000 / steps,
        "self_device_ms_per_step": sum(self_device_us(e) for e in events) / 1000 / steps if on_gpu else None,
        "top": [{"name": e.key, "calls_per_step": e.count / steps, "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps,
                 "self_device_ms_per_step": self_device_us(e) / 1000 / steps if on_gpu else None} for e in top],
    }
    print(f"\n## Decode step profile: {sequences} sequences, {args.layers} layers, {result['attention']}: "
          f"{result['step_ms_median']:.1f} ms a step (median of {steps}); per step under the profiler: self CPU "
          f"{result['self_cpu_ms_per_step']:.1f} ms" + (f", self GPU {result['self_device_ms_per_step']:.1f} ms"
                                                         if on_gpu else "") + "\n")
    print("| operator | calls/step | self CPU ms/step | self GPU ms/step |")
    print("|---|---|---|---|")
    for row in result["top"]:
        gpu = f"{row['self_device_ms_per_step']:.2f}" if on_gpu else "-"
        print(f"| {row['name']} | {row['calls_per_step']:.0f} | {row['self_cpu_ms_per_step']:.2f} | {gpu} |")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--width", type=int, default=896, help="decoder width (Qwen2-0.5B's by default)")
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--mlp", type=int, default=4864)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers for 1. (24 = Qwen2-0.5B)")
    parser.add_argument("--frames", type=int, default=1, help="frames (196 positions each) per prompt in 1.")
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--stock-layers", type=int, default=2, help="decoder layers for 2.")
    parser.add_argument("--stock-frames", type=int, default=32)
    parser.add_argument("--stock-batch", type=int, default=4)
    parser.add_argument("--stock-answer-tokens", type=int, default=128)
    parser.add_argument("--prune-layers", type=int, default=24, help="decoder layers for 3.")
    parser.add_argument("--prune-seqs", type=int, default=16)
    parser.add_argument("--prune-frames", type=int, default=32)
    parser.add_argument("--prune-steps", type=int, default=256)
    parser.add_argument("--timed-steps", type=int, default=8)
    parser.add_argument("--prune-layer", type=int, default=None, help="default: 2, or 0 on models under 8 layers")
    parser.add_argument("--prefix-layers", type=int, default=4, help="decoder layers for 4.")
    parser.add_argument("--prefix-frames", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=3, help="interleaved runs of each side per measurement")
    parser.add_argument("--only", default="1,2,3,4", help="which parts to run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flex"],
                        help="the engine's decode attention (default: flex on CUDA, sdpa elsewhere)")
    return parser


PARTS = {"1": batch_table, "2": long_prompt_ratio, "3": prune_table, "4": prefix_ttft}


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"Qwen2-0.5B-shaped random decoders, vocabulary {args.vocab}, {args.device} {args.dtype}"
          + (f", {args.threads} thread(s)" if args.device == "cpu" else "") + f"; {uptime()}")
    for part in args.only.split(","):
        PARTS[part](args, device)
        if device.type == "cuda":
            print(f"\nPeak GPU memory so far: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB.")
        else:
            print(f"\nPeak resident memory of the process so far: "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB.")


if __name__ == "__main__":
    main()
