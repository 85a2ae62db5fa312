"""The model runner: VTU prefill of one prompt chunk, and one decode step for a batch of ragged sequences,
both reading and writing the block pool.

Prefill is VTU as in ``dymu.llm.vtu``: row-wise work on the chunk's unique rows, attention at full length
with every position at its own RoPE position, one cache entry per virtual position. A chunk never splits a
merged row (see ``request.cut_points``), so chunking changes nothing but the order of work; the chunks of
several requests in one step share one batch for their row-wise work. Decode runs
the projections and MLP of every running sequence as one batch; attention gathers each sequence's entries
from its own slots (padded to the longest, masked) and runs one SDPA call per layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from dymu.engine.block_manager import BlockManager
from dymu.engine.request import Request
from dymu.llm.decoder import Decoder, apply_rope, finish_layer, next_token_logits, project_qkv, rope_tables
from dymu.llm.kv_cache import attention_probs
from dymu.llm.vtu import causal_attention, scatter_mean


def chunk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Queries at entries start.. (n, Hq, hd) over the first ``start + n`` entries (T, Hkv, hd), causally.

    Grouped-query heads are folded into the query rows ((Hkv, groups * n, hd) against (Hkv, T, hd)) rather
    than repeating the keys per query head: a chunk after a long cached prefix then reads the prefix once."""
    n, total = q.shape[0], keys.shape[0]
    num_kv_heads, head_dim = keys.shape[1], keys.shape[2]
    groups = q.shape[1] // num_kv_heads
    grouped = q.transpose(0, 1).reshape(num_kv_heads, groups * n, head_dim)
    allowed = torch.arange(total, device=q.device)[None] <= start + torch.arange(n, device=q.device)[:, None]
    out = F.scaled_dot_product_attention(grouped, keys.transpose(0, 1), values.transpose(0, 1),
                                         attn_mask=allowed.repeat(groups, 1), scale=scale)
    return out.view(num_kv_heads * groups, n, head_dim).transpose(0, 1).reshape(n, -1)


@dataclass
class Chunk:
    """Prompt positions [start, end) of one request, and what VTU needs to run them: the chunk's unique rows,
    each position's row among them (``local``), positions per row (None when nothing is merged), rotations."""

    request: Request
    start: int
    end: int
    rows: torch.Tensor
    local: torch.Tensor
    counts: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor


def make_chunk(decoder: Decoder, request: Request, start: int, end: int) -> Chunk:
    prompt = request.prompt
    mapping = prompt.mapping[start:end]
    rows, local = torch.unique(mapping, sorted=True, return_inverse=True)
    # Rows may be laid out in another order than their positions (a permutation, nothing shared): only when
    # position i plays row i can the rows go through attention as they are.
    in_order = rows.shape[0] == mapping.shape[0] and bool((local == torch.arange(local.shape[0], device=local.device)).all())
    counts = None if in_order else torch.bincount(local, minlength=rows.shape[0])
    cos, sin = rope_tables(decoder, prompt.position_ids()[..., start:end])
    return Chunk(request, start, end, rows, local, counts, cos, sin)


def chunk_layer_attention(pool: BlockManager, layer_index: int, chunk: Chunk, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, scale: float) -> torch.Tensor:
    """One layer's VTU attention for one chunk from its rows' q, k, v: store the chunk's entries, attend over
    the request's entries so far, average each row's positions back to one row."""
    if chunk.counts is not None:
        q, k, v = (t.index_select(0, chunk.local) for t in (q, k, v))
    q, k = apply_rope(q, chunk.cos, chunk.sin), apply_rope(k, chunk.cos, chunk.sin)
    slots = chunk.request.kv.layers[layer_index].slots
    pool.write(slots[chunk.start: chunk.end], k, v)
    if chunk.start == 0:
        out = causal_attention(q, k, v, scale)
    else:
        seen = slots[: chunk.end]
        out = chunk_attention(q, pool.keys.index_select(0, seen), pool.values.index_select(0, seen), chunk.start, scale)
    return out if chunk.counts is None else scatter_mean(out, chunk.local, chunk.counts)


@torch.no_grad()
def prefill_chunks(decoder: Decoder, pool: BlockManager,
                   spans: list[tuple[Request, int, int]]) -> list[torch.Tensor | None]:
    """Run prompt chunks (request, start, end) of several requests through the decoder together (the
    row-wise work as one batch of all their rows, attention per chunk) into their reserved slots. Returns,
    per chunk, the next-token logits (V,) when it ends its prompt, else None."""
    chunks = [make_chunk(decoder, *span) for span in spans]
    sizes = [chunk.rows.shape[0] for chunk in chunks]
    h = torch.cat([chunk.request.prompt.rows.index_select(0, chunk.rows) for chunk in chunks])
    deepstack = deepstack_additions(chunks, sizes)
    for i, layer in enumerate(decoder.layers):
        q, k, v = project_qkv(decoder, layer, h)
        parts = zip(chunks, q.split(sizes), k.split(sizes), v.split(sizes))
        out = torch.cat([chunk_layer_attention(pool, i, c, cq, ck, cv, layer.self_attn.scaling)
                         for c, cq, ck, cv in parts])
        h = finish_layer(layer, h, out)
        for targets, features in deepstack:
            if i < len(features):
                h = h.index_add(0, targets, features[i])
    logits = []
    for chunk, rows in zip(chunks, h.split(sizes)):
        done = chunk.end == chunk.request.prompt.num_positions
        logits.append(next_token_logits(decoder, rows.index_select(0, chunk.local[-1:]))[0] if done else None)
    return logits


def deepstack_additions(chunks: list[Chunk], sizes: list[int]) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Qwen3-VL's DeepStack for a batch of chunks: per chunk with features, the rows of ``h`` that are visual
    rows and, per early layer, the features to add to them after that layer (as VTU's prefill does; a row
    never spans two chunks, so each gets its feature exactly once)."""
    additions, offset = [], 0
    for chunk, size in zip(chunks, sizes):
        prompt = chunk.request.prompt
        if prompt.deepstack:
            visual_rows = prompt.visual_rows()
            index = torch.searchsorted(visual_rows, chunk.rows).clamp(max=visual_rows.shape[0] - 1)
            hit = visual_rows.index_select(0, index) == chunk.rows
            if bool(hit.any()):
                targets = offset + hit.nonzero().squeeze(1)
                additions.append((targets, [f.index_select(0, index[hit]) for f in prompt.deepstack]))
        offset += size
    return additions


def batched_decode_attention(q: torch.Tensor, pool: BlockManager, slots: list[torch.Tensor], scale: float) -> torch.Tensor:
    """One new token per sequence, q (B, Hq, hd), over each sequence's entries at ``slots[b]``: (B, Hq * hd).

    The entries are gathered into one (B, Hkv, longest, hd) batch for SDPA (no key is repeated per query
    head: the query heads of a KV head are its rows), so a step reads each live entry and no more."""
    batch, num_heads, head_dim = q.shape
    lengths = [int(s.shape[0]) for s in slots]
    longest = max(lengths)
    table = pad_sequence(slots, batch_first=True, padding_value=-1) if batch > 1 else slots[0][None]
    if min(lengths) < longest:
        # Padding repeats a written slot: the pool is not zeroed, and a masked NaN would still poison the sum.
        table = torch.where(table < 0, table[:, :1], table)
    num_kv_heads = pool.keys.shape[1]
    flat = table.flatten()
    keys = pool.keys.index_select(0, flat).view(batch, longest, num_kv_heads, head_dim).transpose(1, 2)
    values = pool.values.index_select(0, flat).view(batch, longest, num_kv_heads, head_dim).transpose(1, 2)
    grouped = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    mask = None
    if min(lengths) < longest:
        mask = (torch.arange(longest, device=q.device)[None] < torch.tensor(lengths, device=q.device)[:, None])
        mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(batch, -1)


@torch.no_grad()
def decode(decoder: Decoder, pool: BlockManager, requests: list[Request],
           attention: Callable[..., torch.Tensor] = batched_decode_attention) -> torch.Tensor:
    """Feed every request's last picked token at its next position; return next-token logits (B, V).

    Each request's pruner (if any) reads the attention at its probe layer on the steps it asks for and may
    compact the layers after it before they run. ``attention``: the decode attention over the pool
    (``dymu.engine.attention``; default the gathered SDPA above).
    """
    device = decoder.device
    ids = torch.tensor([r.tokens[-1] for r in requests], device=device)
    cos, sin = rope_tables(decoder, torch.tensor([r.next_position() for r in requests], device=device))
    ordinals = [r.sequence.num_positions + len(r.tokens) - 1 for r in requests]
    probes = [(b, r) for b, r in enumerate(requests)
              if r.generation.pruner is not None and r.generation.pruner.wants_probe(len(r.tokens))]
    h = decoder.embed_tokens(ids)
    for i, layer in enumerate(decoder.layers):
        q, k, v = project_qkv(decoder, layer, h)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_slots = [r.kv.reserve_one(i, ordinals[b]) for b, r in enumerate(requests)]
        pool.write(torch.tensor(new_slots, device=device), k, v)
        scale = layer.self_attn.scaling
        for b, r in probes:
            pruner, step = r.generation.pruner, len(r.tokens)
            if i == pruner.layer:
                keys = pool.keys.index_select(0, r.kv.layers[i].slots).transpose(0, 1)
                weights = attention_probs(q[b: b + 1], keys, scale).mean(dim=(0, 1))
                pruner.observe(step, weights, r.kv)
        out = attention(q, pool, [r.kv.layers[i].slots for r in requests], scale)
        h = finish_layer(layer, h, out)
    return next_token_logits(decoder, h)
