"""Benchmark the batched engine (dymu.engine) in one run, on a Qwen2-0.5B-shaped random decoder with the
real 151936-token vocabulary. Video prompts are those of bench/llm.py: ``--frames`` x 196 visual positions
between ~32 text tokens, merged to 25% of the rows (2 x 2 neighbouring cells) or left unmerged ("off").

1. decode tokens/s with 1, 4, 8, 16 sequences running, against 1, and whole requests/s including prefill;
2. at "off", the engine against transformers' ``generate`` on the same batch (all prompts the same length,
   so no padding is needed); and the merged prompts through the engine against that stock batch;
3. DyRate in the batch: decode step time at the last step, pruned (linear schedule) against unpruned, KV
   bytes really freed, and how many sequences ran at once under one fixed ``kv_cache_gb``;
4. time to first token of a second question about the same video (visual-prefix hit) against the first;
5. peak memory.

    python -m bench.serve                       # a few minutes on 2 CPU cores: 4 layers, small prompts
    python -m bench.serve --layers 24 --frames 32 --answer-tokens 128 --prune-frames 32 --prune-steps 256 \\
        --prune-seqs 16                          # the full sizes
    python -m bench.serve --device cuda --dtype bfloat16 --layers 24 --frames 32 --answer-tokens 256

Ratios within one run are what to read; seconds on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import logging
import resource
import time

import torch

from bench.llm import build_model, video_prompt
from dymu.engine import Engine, EngineConfig
from dymu.engine.block_manager import block_bytes
from dymu.llm import GenerateConfig, LinearSchedule, PruneConfig, VirtualSequence, load_decoder

log = logging.getLogger("bench.serve")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(repeats: int, run, *args, **kwargs) -> dict:
    """The run with the least wall time of ``repeats`` (other load on a shared machine only adds time)."""
    return min((run(*args, **kwargs) for _ in range(repeats)), key=lambda out: out["seconds"])


def run_engine(model, prompts: list[VirtualSequence], config: GenerateConfig, engine_config: EngineConfig,
               predictor=None) -> dict:
    """Answer ``prompts`` together; return wall seconds, step times with every sequence decoding, stats."""
    engine = Engine(model, None, engine_config)
    device = engine.decoder.device
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
    return {"seconds": time.perf_counter() - started, "decode_steps": decode_steps, "stats": engine.stats()}


def stock_generate(model, prompts: list[VirtualSequence], tokens: int) -> dict:
    """transformers' generate on the batch of (unmerged, equal-length) prompts; return its wall seconds."""
    embeds = torch.stack([p.rows for p in prompts])
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (24 = Qwen2-0.5B)")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--frames", type=int, default=1, help="frames (196 positions each) per prompt")
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--prune-seqs", type=int, default=8)
    parser.add_argument("--prune-frames", type=int, default=4)
    parser.add_argument("--prune-steps", type=int, default=64)
    parser.add_argument("--prefix-frames", type=int, default=8)
    parser.add_argument("--prune-layer", type=int, default=None, help="default: 2, or 0 on models under 8 layers")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args)
    decoder = load_decoder(model)
    batches = [int(b) for b in args.batches.split(",")]
    answer = GenerateConfig(max_new_tokens=args.answer_tokens)
    entries = args.frames * 196 + args.text_tokens + args.answer_tokens
    sizes = EngineConfig(kv_cache_gb=kv_gb_for(model, max(batches), entries, 16), max_batch=max(batches))
    run_engine(model, prompts_for(model, 1, 1, 8, True, device), GenerateConfig(max_new_tokens=2), sizes)  # warm-up

    print(f"\n## Engine: {args.layers}-layer Qwen2-0.5B-shaped random decoder, vocabulary {args.vocab}, "
          f"{args.device} {args.dtype}" + (f", {args.threads} threads" if args.device == "cpu" else "") + "\n")
    print(f"Prompts: {args.frames} frame(s) x 196 visual positions + {args.text_tokens} text tokens, "
          f"merged to 25% of the rows unless 'off'; answers of {args.answer_tokens} tokens.\n")
    print("| running | merged | decode tok/s (best step) | vs 1 | engine req/s | generate req/s | engine / generate |")
    print("|---|---|---|---|---|---|---|")
    singles: dict[bool, float] = {}
    stock_rates = {}
    for batch in batches:
        for merged in (False, True):
            prompts = prompts_for(model, batch, args.frames, args.text_tokens, merged, device)
            out = best_of(args.repeats, run_engine, model, prompts, answer, sizes)
            step = min(out["decode_steps"]) if out["decode_steps"] else float("nan")
            tokens_per_s = batch / step
            rate = batch / out["seconds"]
            if not merged:
                stock_rates[batch] = batch / best_of(args.repeats, stock_generate, model, prompts,
                                                     args.answer_tokens)["seconds"]
            if batch == 1:
                singles[merged] = tokens_per_s
            vs_one = tokens_per_s / singles[merged] if merged in singles else float("nan")
            stock = stock_rates[batch]
            print(f"| {batch} | {'25%' if merged else 'off'} | {tokens_per_s:.1f} | {vs_one:.2f}x | {rate:.3f} | "
                  f"{stock:.3f} | {rate / stock:.2f}x |", flush=True)

    # DyRate in the batch: the same sequences with and without pruning, one fixed pool.
    prune_entries = args.prune_frames * 196 + args.text_tokens + args.prune_steps
    fixed = EngineConfig(kv_cache_gb=kv_gb_for(model, max(args.prune_seqs // 2, 1), prune_entries, 16),
                         max_batch=args.prune_seqs)
    roomy = EngineConfig(kv_cache_gb=kv_gb_for(model, args.prune_seqs, prune_entries, 16), max_batch=args.prune_seqs)
    prompts = prompts_for(model, args.prune_seqs, args.prune_frames, args.text_tokens, True, device)
    plain_config = GenerateConfig(max_new_tokens=args.prune_steps)
    prune_config = GenerateConfig(max_new_tokens=args.prune_steps, prune=PruneConfig(
        enabled=True, layer=args.prune_layer if args.prune_layer is not None else (2 if args.layers >= 8 else 0),
        start_step=8, interval=8, min_keep=0.1))
    schedule = LinearSchedule(start=8, end=max(args.prune_steps // 2, 9), final=0.1)
    plain = best_of(args.repeats, run_engine, model, prompts, plain_config, roomy)
    pruned = best_of(args.repeats, run_engine, model, prompts, prune_config, roomy, schedule)
    last_plain, last_pruned = min(plain["decode_steps"][-8:]), min(pruned["decode_steps"][-8:])
    plain_fixed = run_engine(model, prompts, plain_config, fixed)["stats"]
    pruned_fixed = run_engine(model, prompts, prune_config, fixed, schedule)["stats"]
    print(f"\nDyRate in the batch ({args.prune_seqs} sequences of {args.prune_frames} frame(s), step "
          f"{args.prune_steps}, linear schedule to 10% of the visual entries from step 8):\n")
    print("| | decode step ms @last (min of the last 8) | vs unpruned | KV freed by pruning MiB | most running under "
          f"{fixed.kv_cache_gb * 1024:.0f} MiB | preemptions |")
    print("|---|---|---|---|---|---|")
    print(f"| unpruned | {1000 * last_plain:.0f} | 1.00 | 0 | {plain_fixed['most_running']} | "
          f"{plain_fixed['preemptions']} |")
    print(f"| pruned | {1000 * last_pruned:.0f} | {last_pruned / last_plain:.2f} | "
          f"{pruned['stats']['kv_bytes_freed_by_pruning'] / 2**20:.0f} | {pruned_fixed['most_running']} | "
          f"{pruned_fixed['preemptions']} |")

    # Visual-prefix reuse: time to first token of a second question about the same video.
    unmerged_prompt, video = video_prompt(model, args.prefix_frames, args.text_tokens, seed=99)
    video = video.to(device, model.dtype)
    before = args.text_tokens // 2
    prefix = before + args.prefix_frames * 196
    prefix_sizes = EngineConfig(kv_cache_gb=kv_gb_for(model, 3, prefix + 64, 16),
                                prefix_cache_gb=kv_gb_for(model, 1, prefix, 16))
    engine = Engine(model, None, prefix_sizes)
    ttft = []
    for _ in range(2):
        started = time.perf_counter()
        engine.add_request(video, GenerateConfig(max_new_tokens=1), prefix_key="video", prefix_positions=prefix)
        engine.run()
        sync(device)
        ttft.append(time.perf_counter() - started)
    print(f"\nTime to first token, {args.prefix_frames}-frame video ({video.num_positions} positions): first "
          f"question {ttft[0]:.3f} s, second (prefix hit: {engine.stats()['prefix_hits'] == 1}) {ttft[1]:.4f} s, "
          f"{ttft[0] / ttft[1]:.0f}x faster.")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        print(f"\nPeak GPU memory: {peak:.0f} MiB.")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\nPeak resident memory of the process: {peak:.0f} MiB "
              f"(weights {sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20:.0f} MiB).")
    del decoder, unmerged_prompt


if __name__ == "__main__":
    main()
