"""A slow, literal reference of Qwen3-VL's text decoder over a merged prompt, DeepStack included, written
from the description in dymu/llm/vtu.py (float64, Python loops over positions and heads):

    every position n takes its row's hidden state h[mapping[n]]; input norm, q/k/v projections, per-head
    q/k norms; q and k rotated at position n's M-RoPE angles (the model's rotary module gives cos, sin;
    pair i is (x[i], x[i + hd/2])); causal attention of position n over positions 0..n (query head j reads
    kv head j // g); each row's attention output is the mean of its positions' outputs; o_proj and
    residual, post-attention norm, MLP and residual on each row; then, after each of the first layers, each
    visual ROW (not each position) gets its own DeepStack feature added once.
"""
from __future__ import annotations

import copy

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate head vectors (H, hd) by one position's angles (hd,): pair i is (x[i], x[i + hd/2])."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos[:half] - second * sin[:half], second * cos[half:] + first * sin[half:]], dim=-1)


@torch.no_grad()
def reference_position_logits(model: torch.nn.Module, rows: torch.Tensor, mapping: list[int],
                              positions: torch.Tensor, deepstack_by_row: dict[int, list[torch.Tensor]]
                              ) -> torch.Tensor:
    """(N, V) float64 logits of every position of a Qwen3-VL prompt.

    rows (U, D): every row's input embedding (text and merged visual); mapping: the row of each position;
    positions (3, N): M-RoPE (t, h, w) indices; deepstack_by_row: each visual row's features, one per
    early layer."""
    model = copy.deepcopy(model).double()
    lm = model.model.language_model
    config = lm.config
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    groups = heads // kv_heads
    cos, sin = lm.rotary_emb(torch.zeros(1, dtype=torch.float64), positions[:, None].long())
    cos, sin = cos[0], sin[0]
    h = {row: rows[row].double() for row in sorted(set(mapping))}
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn
        q, k, v = [], [], []
        for n, row in enumerate(mapping):
            x = layer.input_layernorm(h[row])
            q.append(rotate(attn.q_norm(attn.q_proj(x).view(heads, hd)), cos[n], sin[n]))
            k.append(rotate(attn.k_norm(attn.k_proj(x).view(kv_heads, hd)), cos[n], sin[n]))
            v.append(attn.v_proj(x).view(kv_heads, hd))
        outputs = []
        for n in range(len(mapping)):
            per_head = []
            for j in range(heads):
                scores = torch.stack([q[n][j] @ k[m][j // groups] * attn.scaling for m in range(n + 1)])
                weights = scores.softmax(0)
                per_head.append(sum(weights[m] * v[m][j // groups] for m in range(n + 1)))
            outputs.append(torch.cat(per_head))
        for row in h:
            mine = [outputs[n] for n, played in enumerate(mapping) if played == row]
            after_attention = h[row] + attn.o_proj(sum(mine) / len(mine))
            h[row] = after_attention + layer.mlp(layer.post_attention_layernorm(after_attention))
        for row, features in deepstack_by_row.items():
            if i < len(features):
                h[row] = h[row] + features[i].double()
    return torch.stack([model.lm_head(lm.norm(h[row])) for row in mapping])


# An image of 8x8 patches (16 merger outputs) played by 8 rows of known sizes 3, 2, 2, 2, 1, 3, 1, 2, groups
# interleaved as DToMe's can be (row 0 at visual positions 0, 1 and 4, ...).
GROUPS = [0, 0, 1, 2, 0, 3, 3, 1, 4, 5, 5, 5, 6, 2, 7, 7]


def known_groups_prompt(model: torch.nn.Module, seed: int = 0, before: int = 4, after: int = 3):
    """A Qwen3-VL image prompt whose visual block is played by rows of known group sizes (``GROUPS``), with
    random rows and DeepStack features: (the ``VirtualSequence``, the reference's (N, V) logits)."""
    from dymu.llm.mrope import sequence_from_ids, stock_positions
    from dymu.tokens import MergedTokens
    from tests.qwen_models import IMAGE_ID, placeholder_ids

    grid = torch.tensor([[1, 8, 8]])
    ids = placeholder_ids(before, len(GROUPS), after, IMAGE_ID, seed=seed)
    positions = stock_positions(model, ids, image_grid_thw=grid)
    width, layers = model.config.text_config.hidden_size, len(model.config.vision_config.deepstack_visual_indexes)
    generator = torch.Generator().manual_seed(seed)
    mapping = torch.tensor(GROUPS)
    u = int(mapping.max()) + 1
    embeds = torch.randn(u, width, generator=generator)
    deepstack = [torch.randn(u, width, generator=generator) for _ in range(layers)]
    tokens = MergedTokens(embeds, torch.bincount(mapping), mapping, [len(GROUPS)], deepstack=deepstack)
    sequence = sequence_from_ids(model, ids, tokens, positions)

    visual = (ids == IMAGE_ID).tolist()
    with torch.no_grad():
        text_rows = model.model.language_model.embed_tokens(ids[~torch.tensor(visual)])
    rows = torch.cat([text_rows, embeds])  # text rows first, then the merged rows, as listed here
    text_index, full_mapping, block = 0, [], iter(GROUPS)
    for is_visual in visual:
        if is_visual:
            full_mapping.append(text_rows.shape[0] + next(block))
        else:
            full_mapping.append(text_index)
            text_index += 1
    by_row = {text_rows.shape[0] + r: [d[r] for d in deepstack] for r in range(u)}
    return sequence, reference_position_logits(model, rows, full_mapping, positions, by_row)
