"""Synthetic KV for bench/serve.py: put running sequences into the state they would be in at decode step
``step`` without computing it, so that a step deep into long answers can be timed in seconds.

Every admitted request gets random keys and values for its prompt and its first ``step - 1`` answer
entries, in the engine's own blocks (``SequenceKV.reserve``), and ``step`` answer tokens (the last is fed
next). With ``keep_visual`` set, the layers after the probe layer are compacted (``SequenceKV.keep``, the
call DyRate's pruner makes) to that fraction of their visual entries, as a schedule that has reached its
final fraction by then would have left them: whole blocks go back to the pool.
"""
from __future__ import annotations

import math

import torch

from dymu.engine import Engine
from dymu.engine.request import DECODING, Request


def fill_prompt(engine: Engine, request: Request, generator: torch.Generator) -> None:
    """Random K/V in the prompt's reserved slots of every layer; the request then decodes."""
    pool = engine.pool
    for layer in request.kv.layers:
        write_random(pool, layer.slots, generator)
    request.prefilled = request.prompt_length()
    request.status = DECODING


def prune_like_schedule(request: Request, probe_layer: int, keep_visual: float, generator: torch.Generator) -> None:
    """Keep every text entry and ``keep_visual`` of the visual ones (a random choice: on random weights the
    scores carry no meaning) in each layer after ``probe_layer``."""
    kv = request.kv
    visual = kv.visual(probe_layer + 1)
    visual_index = visual.nonzero().squeeze(1)
    count = math.ceil(keep_visual * int(visual_index.shape[0]))
    chosen = visual_index[torch.randperm(visual_index.shape[0], generator=generator)[:count].to(visual_index.device)]
    index = torch.cat([(~visual).nonzero().squeeze(1), chosen]).sort().values
    for layer in range(probe_layer + 1, kv.num_layers):
        kv.keep(layer, index)


def fill_answer(engine: Engine, request: Request, step: int, generator: torch.Generator) -> bool:
    """The first ``step - 1`` answer entries in every layer and ``step`` answer tokens; False (nothing
    changed) when the pool has no room for them."""
    kv, entries = request.kv, step - 1
    if kv.blocks_to_append(entries) > engine.pool.num_free:
        return False
    first = request.sequence.num_positions
    ordinals = torch.arange(first, first + entries)
    for layer in range(kv.num_layers):
        write_random(engine.pool, kv.reserve(layer, entries, ordinals, False), generator)
    vocab = engine.decoder.lm_head.weight.shape[0]
    request.tokens.extend(torch.randint(0, vocab, (step,), generator=generator).tolist())
    return True


def write_random(pool, slots: torch.Tensor, generator: torch.Generator) -> None:
    """Random keys and values at ``slots``: rows of one small random table, cycled (drawing gigabytes of
    fresh random numbers would cost more than the steps being timed)."""
    rows = 1021  # prime, so that no block sees the same rows as its neighbour
    table = torch.randn(2, rows, *pool.keys.shape[1:], generator=generator).to(pool.keys.device)
    pick = torch.arange(slots.shape[0], device=pool.keys.device) % rows
    pool.write(slots, table[0].index_select(0, pick), table[1].index_select(0, pick))


def admit_at_step(engine: Engine, step: int, probe_layer: int, keep_visual: float | None, seed: int = 0) -> int:
    """Admit queued requests into ``engine`` and bring each to decode step ``step`` (pruned if
    ``keep_visual``), for as long as the pool holds them; a request whose answer entries no longer fit is
    dropped. Returns how many sequences stand at step ``step`` at once."""
    generator = torch.Generator().manual_seed(seed)
    scheduler = engine.scheduler
    ready: set[int] = set()
    while True:
        impossible = scheduler.admit()
        new = [r for r in scheduler.running if r.id not in ready]
        if impossible or not new:
            break
        for request in new:
            fill_prompt(engine, request, generator)
            if keep_visual is not None:
                prune_like_schedule(request, probe_layer, keep_visual, generator)
            if not fill_answer(engine, request, step, generator):
                engine.abort(request.id)
                return len(ready)
            ready.add(request.id)
    return len(ready)


def time_steps(engine: Engine, count: int) -> list[float]:
    """Seconds of each of ``count`` engine steps (every running sequence decodes one token)."""
    import time

    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        engine.step()
        if engine.decoder.device.type == "cuda":
            torch.cuda.synchronize(engine.decoder.device)
        seconds.append(time.perf_counter() - started)
    return seconds
