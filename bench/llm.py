"""Benchmark the LLM side against the unmerged model, in one run, on a Qwen2-0.5B-shaped random decoder.

A video prompt of ``--frames`` x 196 visual positions (14 x 14 patches per frame) between ~32 text tokens
is merged to 25% by averaging each 2 x 2 block of neighbouring patches (the unmerged model gets each
patch's own embedding: the block's shared content plus patch noise). Reported, per variant:

- prefill time and its saving next to the analytic FLOPs saving (projections, MLP, attention);
- decode ms/token around steps 1, 64 and 256 (median of the steps within +-8), the attention part of a step
  at the end of the answer (what pruning acts on), visual KV entries kept, KV bytes, peak memory;
- KL(unmerged || variant) of the next-token distribution after the prompt, its mean over the answer and
  the greedy agreement, with every variant fed the unmerged model's greedy answer (teacher forcing).

    python bench/llm.py                                  # CPU, float32, 256-token answers
    python bench/llm.py --device cuda --dtype bfloat16
    python bench/llm.py --frames 8 --answer-tokens 64   # a quick look

Timings on a shared machine are noisy; ratios within one run are what to read.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dymu.llm import (
    GroupedKVCache,
    KVCache,
    LinearSchedule,
    PruneConfig,
    Pruner,
    VirtualSequence,
    decode_step,
    load_decoder,
    new_cache,
    prefill,
)
from dymu.llm.decoder import Decoder

log = logging.getLogger("bench.llm")

GRID = 14  # patches per side of a frame (196 per frame)
BLOCK = 2  # merged blocks are BLOCK x BLOCK neighbouring patches: 25% of the positions remain
CHECKPOINTS = (1, 64, 256)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Qwen2-0.5B's widths, unless the caller's options narrow them (bench/serve.py --width ...: a dry run)
    config = Qwen2Config(
        hidden_size=getattr(args, "width", 896), num_hidden_layers=args.layers,
        num_attention_heads=getattr(args, "heads", 14), num_key_value_heads=getattr(args, "kv_heads", 2),
        intermediate_size=getattr(args, "mlp", 4864), vocab_size=args.vocab, max_position_embeddings=32768,
        eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # drawn where it runs: a CPU takes seconds to draw 0.6B weights, a GPU not
        model = Qwen2ForCausalLM(config)
    return model.to(getattr(torch, args.dtype)).eval()


def video_prompt(model: torch.nn.Module, frames: int, text_tokens: int,
                 seed: int) -> tuple[VirtualSequence, VirtualSequence]:
    """(unmerged, merged) prompts: text, frames x 196 visual positions, text. Merged rows are 2x2 block means."""
    generator = torch.Generator().manual_seed(seed)
    embed = model.get_input_embeddings()
    width, scale = embed.weight.shape[1], float(embed.weight.detach().std())
    blocks_per_side = GRID // BLOCK
    # Patch (f, y, x) belongs to block (f, y // 2, x // 2): neighbouring patches share a row.
    ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    block_of_patch = ((ys // BLOCK) * blocks_per_side + xs // BLOCK).reshape(-1)
    blocks_per_frame = blocks_per_side**2
    visual_map = (torch.arange(frames)[:, None] * blocks_per_frame + block_of_patch[None]).reshape(-1)
    content = torch.randn(frames * blocks_per_frame, width, generator=generator) * scale
    patches = content[visual_map] + 0.5 * scale * torch.randn(visual_map.shape[0], width, generator=generator)
    merged_rows = torch.zeros_like(content).index_add_(0, visual_map, patches) / BLOCK**2

    before, after = text_tokens // 2, text_tokens - text_tokens // 2
    ids = torch.randint(0, embed.weight.shape[0], (text_tokens,), generator=generator)
    with torch.no_grad():
        text = embed(ids.to(embed.weight.device)).float().cpu()
    n_visual = visual_map.shape[0]
    visual = torch.cat([torch.zeros(before, dtype=torch.bool), torch.ones(n_visual, dtype=torch.bool),
                        torch.zeros(after, dtype=torch.bool)])
    unmerged = VirtualSequence(torch.cat([text[:before], patches, text[before:]]),
                               torch.arange(before + n_visual + after), visual)
    u_visual = content.shape[0]
    mapping = torch.cat([torch.arange(before), before + visual_map, before + u_visual + torch.arange(after)])
    merged = VirtualSequence(torch.cat([text[:before], merged_rows, text[before:]]), mapping, visual)
    return unmerged, merged


def prefill_flops(decoder: Decoder, rows: int, positions: int, vocab: int) -> float:
    """Multiply-adds x 2 of a prefill: projections and MLP on ``rows``, causal attention over ``positions``."""
    width = decoder.embed_tokens.weight.shape[1]
    q_width, kv_width = decoder.num_heads * decoder.head_dim, decoder.num_kv_heads * decoder.head_dim
    intermediate = decoder.layers[0].mlp.gate_proj.out_features
    per_row = 2 * (width * q_width + 2 * width * kv_width + q_width * width + 3 * width * intermediate)
    attention = 2 * 2 * q_width * positions * (positions + 1) / 2  # QK^T and PV over the causal triangle
    return decoder.num_layers * (rows * per_row + attention) + 2 * width * vocab


class PeakMemory:
    """Peak extra memory inside a ``with`` block: CUDA allocator peak, or the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs; Linux with glibc) on CPU. tracemalloc would not see tensors."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_bytes = device, 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            # Hand freed heap pages back first, so that earlier phases' memory does not hide this one's.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.baseline
        else:
            self.peak_bytes = _proc_status_bytes("VmHWM") - self.baseline


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Run:
    """One variant: how its prompt was run, then its decode state and measurements."""

    name: str
    prefill_seconds: float = float("nan")
    prefill_flops: float = float("nan")
    prefill_peak: int = 0
    cache: KVCache | GroupedKVCache | None = None
    logits: torch.Tensor | None = None
    position: int = 0
    pruner: Pruner | None = None
    log_probs: list[torch.Tensor] = field(default_factory=list)  # [0] = after the prompt
    step_seconds: list[float] = field(default_factory=list)
    attention_ms: float = float("nan")


def run_prefill(decoder: Decoder, sequence: VirtualSequence, mode: str, kind: str, steps: int, run: Run) -> Run:
    entries = sequence.num_positions if mode == "vtu" else sequence.num_rows
    with PeakMemory(decoder.device) as memory:
        run.cache = new_cache(decoder, kind, entries + steps)
        started = time.perf_counter()
        out = prefill(decoder, sequence, run.cache, mode=mode)
        _sync(decoder.device)
        run.prefill_seconds = time.perf_counter() - started
    run.prefill_peak = memory.peak_bytes
    run.logits, run.position = out.logits, out.next_position
    run.log_probs.append(out.logits.float().log_softmax(-1).cpu())
    log.info("%s: prefill %.1fs", run.name, run.prefill_seconds)
    return run


def fork(run: Run, name: str, pruner: Pruner) -> Run:
    """A variant that continues from ``run``'s prompt (same prefill) with its own cache and a pruner."""
    return Run(name, run.prefill_seconds, run.prefill_flops, run.prefill_peak, copy.deepcopy(run.cache),
               run.logits, run.position, pruner, list(run.log_probs))


@torch.no_grad()
def decode_lockstep(decoder: Decoder, runs: list[Run], steps: int) -> None:
    """Decode every variant one step at a time, in turn, so that machine noise falls on all of them alike.

    All are fed the first run's greedy tokens (teacher forcing), so their distributions stay comparable.
    """
    for step in range(1, steps + 1):
        token = int(runs[0].logits.argmax())
        for run in runs[step % len(runs):] + runs[: step % len(runs)]:
            started = time.perf_counter()
            run.logits = decode_step(decoder, run.cache, token, run.position + step - 1, step, run.pruner)
            _sync(decoder.device)
            run.step_seconds.append(time.perf_counter() - started)
            run.log_probs.append(run.logits.float().log_softmax(-1).cpu())
        if step % 32 == 0:
            log.info("decoded %d / %d steps", step, steps)
    for _ in range(3):
        for run in runs:
            ms = attention_ms(decoder, run.cache)
            run.attention_ms = ms if math.isnan(run.attention_ms) else min(run.attention_ms, ms)


def attention_ms(decoder: Decoder, cache: KVCache | GroupedKVCache, repeats: int = 3) -> float:
    """Time of the attention part of one decode step over the cache as it is (all layers)."""
    q = torch.randn(1, decoder.num_heads, decoder.head_dim, device=decoder.device, dtype=decoder.dtype)
    scale = decoder.head_dim**-0.5
    _sync(decoder.device)
    started = time.perf_counter()
    for _ in range(repeats):
        for layer in range(cache.num_layers):
            cache.attend(layer, q, scale)
    _sync(decoder.device)
    return 1000 * (time.perf_counter() - started) / repeats


def ms_around(run: Run, step: int) -> float:
    """Median ms of the decode steps within 8 of ``step`` (the median shrugs off a neighbour's burst)."""
    window = sorted(run.step_seconds[max(step - 9, 0): step + 8])
    return 1000 * window[len(window) // 2] if window else float("nan")


def kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference.exp() * (reference - other)).sum())


def markdown(runs: list[Run], reference: Run, steps: int) -> str:
    checkpoints = [c for c in CHECKPOINTS if c <= steps] or [steps]
    header = ["variant", "prefill s", "prefill time saved", "FLOPs saved", "KL after prompt", "mean KL answer",
              "greedy agree"] + [f"ms/tok @{c}" for c in checkpoints] + [
              f"attn ms @{steps}", f"visual KV @{steps}", f"KV MiB @{steps}", "prefill peak MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    last_layer = reference.cache.num_layers - 1
    for run in runs:
        kls = [kl(r, o) for r, o in zip(reference.log_probs, run.log_probs)]
        agree = [int(r.argmax()) == int(o.argmax()) for r, o in zip(reference.log_probs[1:], run.log_probs[1:])]
        cells = [
            run.name,
            f"{run.prefill_seconds:.2f}",
            f"{1 - run.prefill_seconds / reference.prefill_seconds:.1%}",
            f"{1 - run.prefill_flops / reference.prefill_flops:.1%}",
            f"{kls[0]:.2e}",
            f"{sum(kls[1:]) / max(len(kls) - 1, 1):.2e}",
            f"{sum(agree) / max(len(agree), 1):.1%}",
            *[f"{ms_around(run, c):.1f}" for c in checkpoints],
            f"{run.attention_ms:.1f}",
            str(run.cache.num_visual(last_layer)),
            f"{run.cache.nbytes() / 2**20:.0f}",
            f"{run.prefill_peak / 2**20:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--frames", type=int, default=32, help="frames of 196 visual positions")
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=256, help="decode steps per answer")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--prune-layer", type=int, default=2)
    parser.add_argument("--min-keep", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is steadiest on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    model = build_model(args)
    decoder = load_decoder(model)
    unmerged, merged = video_prompt(model, args.frames, args.text_tokens, args.seed)
    steps, vocab = args.answer_tokens, args.vocab
    n, u = merged.num_positions, merged.num_rows
    log.info("prompt: %d positions (%d visual), %d rows after merging", n, merged.num_visual, u)
    warmup = VirtualSequence(unmerged.rows[:64], torch.arange(64), unmerged.visual[:64])
    prefill(decoder, warmup, new_cache(decoder, "expanded", 64))

    full, merged_flops = prefill_flops(decoder, n, n, vocab), prefill_flops(decoder, u, n, vocab)
    reference = run_prefill(decoder, unmerged, "vtu", "expanded", steps, Run("unmerged (stock)", prefill_flops=full))
    vtu = run_prefill(decoder, merged, "vtu", "expanded", steps, Run("VTU", prefill_flops=merged_flops))
    grouped = run_prefill(decoder, merged, "vtu", "grouped", steps,
                          Run("VTU, grouped KV cache", prefill_flops=merged_flops))
    no_vtu = run_prefill(decoder, merged, "no_vtu", "expanded", steps,
                         Run("no VTU (merged rows at consecutive positions)",
                             prefill_flops=prefill_flops(decoder, u, u, vocab)))
    prune = PruneConfig(enabled=True, layer=args.prune_layer, start_step=8, interval=8, min_keep=args.min_keep)
    schedule = LinearSchedule(start=8, end=max(steps // 2, 9), final=args.min_keep)
    rule_run = fork(vtu, "VTU + pruning (attention-fall rule)", Pruner(prune, decoder.num_layers))
    schedule_run = fork(vtu, "VTU + pruning (linear schedule)", Pruner(prune, decoder.num_layers, schedule))
    runs = [reference, vtu, grouped, no_vtu, rule_run, schedule_run]
    decode_lockstep(decoder, runs, steps)

    last = min(256, steps)
    flops_saved = 1 - vtu.prefill_flops / reference.prefill_flops
    time_saved = 1 - vtu.prefill_seconds / reference.prefill_seconds
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    threads = f", {args.threads} thread(s)" if args.device == "cpu" else ""
    print(f"\n## LLM side: {args.layers}-layer Qwen2-0.5B-shaped random decoder, {args.device} {args.dtype}{threads}\n")
    print(f"Prompt: {n} positions ({merged.num_visual} visual = {args.frames} frames x 196, merged to {u} rows = "
          f"{u / n:.1%} of the positions), answers of {steps} tokens, every variant fed the unmerged model's "
          f"greedy answer and decoded in lockstep.\n")
    print(markdown(runs, reference, steps))
    print(f"\n- VTU prefill: time saved {time_saved:.1%} vs FLOPs saved {flops_saved:.1%} -> "
          f"{time_saved / flops_saved:.0%} of the FLOPs saving realised (target >= 80%).")
    for run in (rule_run, schedule_run, grouped):
        print(f"- {run.name}: decode ms/token @{last} = {ms_around(run, last) / ms_around(vtu, last):.0%} of VTU's; "
              f"attention part {run.attention_ms / vtu.attention_ms:.0%}"
              + (f"; kept trace {_short(run.pruner.trace)}" if run.pruner else ""))
    print(f"- Per decode step the weights are {weight_bytes / 2**20:.0f} MiB and VTU's unpruned KV cache "
          f"{vtu.cache.nbytes() / 2**20:.0f} MiB: at batch 1 pruning can remove at most "
          f"{vtu.cache.nbytes() / (weight_bytes + vtu.cache.nbytes()):.0%} of the bytes a step reads.")


def _short(trace: list[tuple[int, int]]) -> str:
    if len(trace) <= 6:
        return str(trace)
    return f"{trace[:3]} ... {trace[-2:]}"


if __name__ == "__main__":
    main()
