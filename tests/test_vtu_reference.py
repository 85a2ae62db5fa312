"""VTU prefill (dymu/llm/vtu.py) against a slow, literal reference of the decoder written straight from the
description in shared/DESIGN.md, on random merged prompts from unmerged to one row for the whole visual block.

Reference, per decoder layer, in float64 with Python loops over positions:
    every position n takes its row's hidden state h[mapping[n]]; input norm and q/k/v projections;
    q and k rotated at position n (RoPE, angle n * theta^(-2i/hd) on the pairs (i, i + hd/2));
    causal attention of position n over positions 0..n (grouped-query: query head j reads kv head j // g);
    each row's attention output is the mean of the outputs of its positions;
    o_proj and residual, then the post-attention norm, MLP and residual on each row.
The KV cache must hold each position's rotated key and its value.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from dymu.llm import KVCache, VirtualSequence, load_decoder, prefill
from tests.llm_models import single_thread, tiny_decoder  # noqa: F401 (fixture)

BEFORE, VISUAL, AFTER = 5, 30, 4


def rope(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """Rotate one head vector (hd,) to ``position``: pair i is (x[i], x[i + hd/2])."""
    half = x.shape[0] // 2
    out = x.clone()
    for i in range(half):
        angle = position * theta ** (-2 * i / x.shape[0])
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def reference_prefill(model: torch.nn.Module, rows: torch.Tensor, mapping: list[int]):
    """Logits of every position and each layer's rotated keys and values per position (float64)."""
    model = copy.deepcopy(model).double()
    config = model.config
    theta = config.rope_parameters["rope_theta"]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hd = config.hidden_size // heads
    groups = heads // kv_heads
    h = [row.double() for row in rows]
    cache = []
    for layer in model.model.layers:
        attn = layer.self_attn
        q, k, v = [], [], []
        for n, row in enumerate(mapping):
            x = layer.input_layernorm(h[row])
            q.append([rope(head, n, theta) for head in attn.q_proj(x).view(heads, hd)])
            k.append([rope(head, n, theta) for head in attn.k_proj(x).view(kv_heads, hd)])
            v.append(list(attn.v_proj(x).view(kv_heads, hd)))
        cache.append((k, v))
        outputs = []
        for n in range(len(mapping)):
            per_head = []
            for j in range(heads):
                logits = [float(q[n][j] @ k[m][j // groups]) * attn.scaling for m in range(n + 1)]
                top = max(logits)
                weights = [math.exp(logit - top) for logit in logits]
                per_head.append(sum(w * v[m][j // groups] for m, w in enumerate(weights)) / sum(weights))
            outputs.append(torch.cat(per_head))
        new_h = []
        for row in range(len(h)):
            mine = [outputs[n] for n, r in enumerate(mapping) if r == row]
            after_attn = h[row] + attn.o_proj(sum(mine) / len(mine))
            new_h.append(after_attn + layer.mlp(layer.post_attention_layernorm(after_attn)))
        h = new_h
    logits = [model.lm_head(model.model.norm(h[row])) for row in mapping]
    return torch.stack(logits), cache


def merged_prompt(model: torch.nn.Module, num_groups: int, seed: int) -> VirtualSequence:
    """Text, VISUAL positions spread over ``num_groups`` rows at random (groups need not be contiguous, as
    after temporal merging), text."""
    gen = torch.Generator().manual_seed(seed)
    width = model.config.hidden_size
    assignment = torch.cat([torch.arange(num_groups), torch.randint(0, num_groups, (VISUAL - num_groups,),
                                                                     generator=gen)])
    assignment = assignment[torch.randperm(VISUAL, generator=gen)]
    _, visual_map = assignment.unique(sorted=False, return_inverse=True)
    rows = torch.randn(BEFORE + num_groups + AFTER, width, generator=gen) * 0.05
    mapping = torch.cat([torch.arange(BEFORE), BEFORE + visual_map, BEFORE + num_groups + torch.arange(AFTER)])
    visual = torch.zeros(mapping.shape[0], dtype=torch.bool)
    visual[BEFORE: BEFORE + VISUAL] = True
    return VirtualSequence(rows, mapping, visual)


@pytest.mark.parametrize("num_groups", [VISUAL, 17, 6, 1])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_vtu_prefill_matches_the_literal_reference(family, num_groups):
    model = tiny_decoder(family, layers=2)
    sequence = merged_prompt(model, num_groups, seed=num_groups)
    decoder = load_decoder(model)
    cache = KVCache(decoder.num_layers, decoder.num_kv_heads, decoder.head_dim, 64, decoder.device, decoder.dtype)
    out = prefill(decoder, sequence, cache, all_logits=True)
    with torch.no_grad():
        expected, expected_cache = reference_prefill(model, sequence.rows, sequence.mapping.tolist())
    torch.testing.assert_close(out.position_logits.double(), expected, atol=2e-5, rtol=1e-4)
    assert out.next_position == sequence.num_positions
    for i, (keys, values) in enumerate(expected_cache):
        assert cache.length(i) == sequence.num_positions
        expected_keys = torch.stack([torch.stack(per_position) for per_position in keys], dim=1)
        expected_values = torch.stack([torch.stack(per_position) for per_position in values], dim=1)
        torch.testing.assert_close(cache.keys(i).double(), expected_keys, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(cache.values(i).double(), expected_values, atol=2e-5, rtol=1e-4)
