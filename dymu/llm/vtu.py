"""Prefill with virtual token unmerging (VTU), and the "no VTU" baseline.

VTU (DyMU): the LLM is given U unique rows but computes as if it had all N original positions. Per layer,
the row-wise work (norms, q/k/v/o projections, MLP) runs on the U rows only; attention runs at full length:
q, k and v are expanded to N with the mapping, rotated at each position's own RoPE position, attended
causally, and each group's N outputs are averaged back to one row before o_proj. With nothing merged this
is exactly the stock forward pass. The KV cache receives all N expanded entries.

With M-RoPE (Qwen-VL) each position is rotated at its own (t, h, w) index, and Qwen3-VL's DeepStack features
are added to the visual rows after the first layers, as the stock model adds them to the visual positions
(a merged row gets its merged feature once, however many positions it plays). The cache then records entry
ids instead of positions (the M-RoPE index is not one number): the prompt's entries are numbered up to
``next_position - 1`` so that decode steps, which count up from ``next_position``, keep them ascending.

"No VTU" feeds the U rows at consecutive positions, as if the merged sequence were the whole prompt (with
M-RoPE: each row at its first position's (t, h, w), see ``VirtualSequence.consecutive``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dymu.errors import DymuError
from dymu.llm.decoder import Decoder, apply_rope, finish_layer, next_token_logits, project_qkv, rope_tables
from dymu.llm.grouped_cache import GroupedKVCache
from dymu.llm.kv_cache import KVCache
from dymu.llm.sequence import VirtualSequence


@dataclass
class PrefillOutput:
    """logits: (V,) next-token logits after the prompt; next_position: RoPE position of the first generated
    token; position_logits: (N, V) logits of every virtual position when asked for (a merged row's positions
    share its logits)."""

    logits: torch.Tensor
    next_position: int
    position_logits: torch.Tensor | None = None


def scatter_mean(x: torch.Tensor, mapping: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Average the rows of x (N, F) that share a group: (U, F), with counts (U,) = positions per group."""
    sums = torch.zeros(counts.shape[0], x.shape[1], device=x.device, dtype=torch.float32)
    sums.index_add_(0, mapping, x.float())
    return (sums / counts[:, None]).to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q (N, Hq, hd) over k, v (N, Hkv, hd) (grouped-query) -> (N, Hq * hd)."""
    groups = q.shape[1] // k.shape[1]
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out[0].transpose(0, 1).reshape(q.shape[2], -1)


def vtu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mapping: torch.Tensor | None,
                  cos: torch.Tensor, sin: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention at full length from the rows' q (U, Hq, hd), k and v (U, Hkv, hd).

    Expands them to the N positions with ``mapping`` (None: nothing merged), rotates q and k at each
    position's own RoPE position (cos, sin (N, hd)), attends causally, and returns the per-position output
    (N, Hq * hd), before the group mean and o_proj.
    """
    if mapping is not None:
        q, k, v = (t.index_select(0, mapping) for t in (q, k, v))
    return causal_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, scale)


@torch.no_grad()
def prefill(decoder: Decoder, sequence: VirtualSequence, cache: KVCache | GroupedKVCache, mode: str = "vtu",
            all_logits: bool = False) -> PrefillOutput:
    """Run the prompt through the decoder, filling ``cache`` (which must be empty).

    mode "vtu": every position at its own RoPE position, row-wise work on the unique rows only.
    mode "no_vtu": the unique rows in order of first appearance at consecutive positions.
    """
    sequence = check_sequence(decoder, sequence)
    if mode == "no_vtu":
        sequence = sequence.consecutive()
    elif mode != "vtu":
        raise DymuError(f"unknown prefill mode {mode!r} (expected 'vtu' or 'no_vtu')")
    if any(cache.length(i) for i in range(cache.num_layers)):
        raise DymuError("prefill needs an empty KV cache")
    if sequence.positions is not None and isinstance(cache, GroupedKVCache):
        raise DymuError("the grouped KV cache rotates keys by 1-D position; M-RoPE (Qwen-VL) prompts need "
                        "kv_cache 'expanded'")

    merged = not sequence.is_identity()
    mapping = sequence.mapping if merged else None
    counts = torch.bincount(sequence.mapping, minlength=sequence.num_rows) if merged else None
    positions = sequence.position_ids()
    cos, sin = rope_tables(decoder, positions)
    entry_ids = cache_entry_ids(sequence)
    deepstack = sequence.deepstack or []
    if len(deepstack) > decoder.num_layers:
        raise DymuError(f"{len(deepstack)} DeepStack features for a decoder of {decoder.num_layers} layers")
    visual_rows = sequence.visual_rows() if deepstack else None

    h = sequence.rows
    for i, layer in enumerate(decoder.layers):
        q, k, v = project_qkv(decoder, layer, h)
        cache.add(i, k, v, sequence.mapping, entry_ids, sequence.visual, cos, sin)
        out = vtu_attention(q, k, v, mapping, cos, sin, layer.self_attn.scaling)
        if merged:
            out = scatter_mean(out, sequence.mapping, counts)
        h = finish_layer(layer, h, out)
        if i < len(deepstack):
            h = h.index_add(0, visual_rows, deepstack[i])

    last_row = sequence.mapping[-1:]
    logits = next_token_logits(decoder, h.index_select(0, last_row))[0]
    position_logits = next_token_logits(decoder, h).index_select(0, sequence.mapping) if all_logits else None
    return PrefillOutput(logits, sequence.next_position, position_logits)


def cache_entry_ids(sequence: VirtualSequence) -> torch.Tensor:
    """(N,) the number the KV cache records for each prompt entry: its position for 1-D RoPE; for M-RoPE,
    ascending ids ending at ``next_position - 1`` (negative for long visual blocks), unique and below the
    decode steps' positions, which is all pruning needs to match entries across layers."""
    ids = torch.arange(sequence.num_positions, device=sequence.mapping.device)
    if sequence.positions is None:
        return ids
    return ids + (sequence.next_position - sequence.num_positions)


def check_sequence(decoder: Decoder, sequence: VirtualSequence) -> VirtualSequence:
    """Validate a sequence against the model (contract, context length, hidden size); return it on the
    model's device and dtype."""
    sequence.validate(decoder.max_positions)
    if sequence.positions is not None and not decoder.mrope:
        raise DymuError("the sequence has M-RoPE (t, h, w) positions but the decoder uses 1-D RoPE")
    hidden = decoder.embed_tokens.weight.shape[1]
    if sequence.rows.shape[1] != hidden:
        raise DymuError(f"rows have {sequence.rows.shape[1]} features but the model's hidden size is {hidden}")
    return sequence.to(decoder.device, decoder.dtype)
