"""VTU prefill: exact on an unmerged prompt, exact at the first layer on duplicate rows, closer to the
unmerged model than feeding merged rows at consecutive positions; bad inputs fail clearly."""
from __future__ import annotations

import pytest
import torch

from dymu.errors import DymuError
from dymu.llm import (
    GenerateConfig,
    Generation,
    KVCache,
    LinearSchedule,
    PruneConfig,
    VirtualSequence,
    build_sequence,
    generate,
    load_decoder,
    prefill,
)
from dymu.llm.decoder import project_qkv, rope_tables
from dymu.llm.vtu import vtu_attention
from dymu.tokens import MergedTokens
from tests.llm_models import merged_prompt, single_thread, tiny_decoder  # noqa: F401 (fixture)


def empty_cache(decoder, capacity: int = 64) -> KVCache:
    return KVCache(decoder.num_layers, decoder.num_kv_heads, decoder.head_dim, capacity, decoder.device, decoder.dtype)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p || q) of two next-token distributions given as logits."""
    p, q = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_identity_mapping_matches_stock_model(family):
    model = tiny_decoder(family)
    ids = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(1))
    decoder = load_decoder(model)
    out = prefill(decoder, build_sequence(model, [ids]), empty_cache(decoder), all_logits=True)
    with torch.no_grad():
        stock = model(ids[None]).logits[0]
    torch.testing.assert_close(out.position_logits, stock, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, stock[-1], atol=1e-5, rtol=1e-5)
    assert out.next_position == 37


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_first_layer_attention_at_full_length_equals_stock(family):
    model = tiny_decoder(family)
    sequence = merged_prompt(model)
    unmerged = sequence.unmerged()
    captured = {}

    def capture(module, args, output):
        captured["out"] = output[0][0]

    hook = model.model.layers[0].self_attn.register_forward_hook(capture)
    with torch.no_grad():
        model(inputs_embeds=unmerged.rows[None])
    hook.remove()

    decoder = load_decoder(model)
    layer = decoder.layers[0]
    cos, sin = rope_tables(decoder, torch.arange(sequence.num_positions))
    with torch.no_grad():
        q, k, v = project_qkv(decoder, layer, sequence.rows)
        per_position = vtu_attention(q, k, v, sequence.mapping, cos, sin, layer.self_attn.scaling)
        ours = layer.self_attn.o_proj(per_position)
    assert ours.shape == (sequence.num_positions, 64) and sequence.num_rows < sequence.num_positions
    torch.testing.assert_close(ours, captured["out"], atol=1e-5, rtol=1e-5)

    # The cache holds every position, and duplicates keep distinct keys (each rotated at its own position).
    cache = empty_cache(decoder)
    prefill(decoder, sequence, cache)
    assert cache.length(0) == sequence.num_positions
    assert torch.equal(cache.values(0)[:, 6], cache.values(0)[:, 7])
    assert not torch.allclose(cache.keys(0)[:, 6], cache.keys(0)[:, 7])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_vtu_is_closer_to_unmerged_model_than_no_vtu(family):
    model = tiny_decoder(family, layers=3)
    decoder = load_decoder(model)
    vtu_kl, no_vtu_kl = [], []
    for seed in range(4):
        sequence = merged_prompt(model, seed=seed, groups=12, group_size=4)
        with torch.no_grad():
            reference = model(inputs_embeds=sequence.unmerged().rows[None]).logits[0, -1]
        vtu = prefill(decoder, sequence, empty_cache(decoder, 80), mode="vtu")
        no_vtu = prefill(decoder, sequence, empty_cache(decoder, 80), mode="no_vtu")
        assert no_vtu.next_position == sequence.num_rows and vtu.next_position == sequence.num_positions
        vtu_kl.append(kl(reference, vtu.logits))
        no_vtu_kl.append(kl(reference, no_vtu.logits))
    assert all(k < n for k, n in zip(vtu_kl, no_vtu_kl)), (vtu_kl, no_vtu_kl)


def test_build_sequence_from_segments():
    model = tiny_decoder("qwen2")
    embeds = torch.randn(3, 64)
    merged = MergedTokens(embeds=embeds, sizes=torch.tensor([2, 1, 3]), mapping=torch.tensor([0, 0, 1, 2, 2, 2]),
                          positions_per_frame=[6])
    sequence = build_sequence(model, [[5, 6], merged, torch.tensor([7])])
    assert sequence.mapping.tolist() == [0, 1, 2, 2, 3, 4, 4, 4, 5]
    assert sequence.visual.tolist() == [False, False] + [True] * 6 + [False]
    torch.testing.assert_close(sequence.rows[2:5], embeds)
    torch.testing.assert_close(sequence.rows[5], model.get_input_embeddings().weight[7].detach())
    consecutive = sequence.consecutive()
    assert consecutive.num_positions == 6 and consecutive.visual.tolist() == [False, False, True, True, True, False]


def test_bf16_model_keeps_its_dtype():
    model = tiny_decoder("llama").to(torch.bfloat16)
    sequence = merged_prompt(model)
    result = generate(model, sequence, GenerateConfig(max_new_tokens=4, keep_logits=True))
    assert len(result.tokens) == 4 and result.logits[0].dtype == torch.float32
    assert build_sequence(model, [[1, 2]]).rows.dtype == torch.bfloat16


def _sequence(mapping, visual, rows=3, width=64):
    return VirtualSequence(torch.randn(rows, width), torch.tensor(mapping), torch.tensor(visual))


@pytest.mark.parametrize(
    "sequence, message",
    [
        (_sequence([0, 1, 3], [False, True, True]), "outside"),
        (_sequence([0, 1, 1], [False, True, True]), "not used"),
        (_sequence([0, 0, 1, 2], [False, False, True, True]), "text position"),
        (_sequence([0, 1, 2], [False, True]), "shaped like mapping"),
        (VirtualSequence(torch.randn(2, 64), torch.tensor([0.0, 1.0]), torch.tensor([False, True])), "int64"),
        (_sequence([0, 1, 2], [False, True, False], width=32), "hidden size"),
    ],
)
def test_bad_input_is_a_clear_error(sequence, message):
    model = tiny_decoder("qwen2")
    with pytest.raises(DymuError, match=message):
        generate(model, sequence, GenerateConfig(max_new_tokens=2))


def test_visual_block_longer_than_context_is_an_error():
    model = tiny_decoder("llama", max_position_embeddings=64)
    merged = MergedTokens(embeds=torch.randn(4, 64), sizes=torch.full((4,), 20),
                          mapping=torch.arange(4).repeat_interleave(20), positions_per_frame=[80])
    with pytest.raises(DymuError, match="context of 64"):
        build_sequence(model, [[1, 2], merged, [3]])
    mapping = torch.cat([torch.arange(2), torch.arange(2, 6).repeat_interleave(20)])
    sequence = VirtualSequence(torch.randn(6, 64), mapping, torch.tensor([False] * 2 + [True] * 80))
    with pytest.raises(DymuError, match="context"):
        generate(model, sequence, GenerateConfig(max_new_tokens=2))


def test_llava_onevision_checkpoint(tiny_ov):
    """The decoder inside a LLaVA-OneVision checkpoint: identity prefill matches its own LLM + lm_head."""
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_ov).eval()
    ids = torch.randint(0, 200, (30,), generator=torch.Generator().manual_seed(0))
    decoder = load_decoder(model)
    out = prefill(decoder, build_sequence(model, [ids]), empty_cache(decoder), all_logits=True)
    with torch.no_grad():
        hidden = model.model.language_model(input_ids=ids[None]).last_hidden_state
        stock = model.lm_head(hidden)[0]
    torch.testing.assert_close(out.position_logits, stock, atol=1e-5, rtol=1e-5)
    sequence = merged_prompt(model.model.language_model, seed=2)
    result = generate(model, sequence, GenerateConfig(max_new_tokens=5, eos_token_ids=()))
    assert len(result.tokens) == 5 and result.virtual_length == sequence.num_positions


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_grouped_cache_decodes_like_the_expanded_one(family):
    model = tiny_decoder(family, layers=3)
    sequence = merged_prompt(model, groups=10, group_size=4)
    results = {}
    for kind in ("expanded", "grouped"):
        generation = Generation(model, sequence, GenerateConfig(max_new_tokens=16, kv_cache=kind, keep_logits=True))
        list(generation)
        results[kind] = generation
    expanded, grouped = results["expanded"], results["grouped"]
    assert grouped.result.tokens == expanded.result.tokens
    for a, b in zip(grouped.result.logits, expanded.result.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    cache = grouped.cache
    assert cache.length(0) == sequence.num_positions + 15 and cache.num_rows(0) == sequence.num_rows + 15
    assert cache.nbytes() < expanded.cache.nbytes()


def test_grouped_cache_pruning_drops_rows_no_entry_plays():
    model = tiny_decoder("qwen2", layers=3)
    sequence = merged_prompt(model, groups=10, group_size=4)
    prune = PruneConfig(enabled=True, layer=0, start_step=3, interval=100, min_keep=0.2)
    runs = {}
    for kind in ("expanded", "grouped"):
        generation = Generation(model, sequence, GenerateConfig(max_new_tokens=10, kv_cache=kind, keep_logits=True,
                                                                prune=prune), predictor=LinearSchedule(0, 1, 0.0))
        list(generation)
        runs[kind] = generation
    grouped, expanded = runs["grouped"].cache, runs["expanded"].cache
    assert runs["grouped"].result.kept_trace == runs["expanded"].result.kept_trace == [(1, 40), (3, 8)]
    assert torch.equal(grouped.positions(1), expanded.positions(1))
    kept_rows = torch.unique(sequence.mapping[grouped.positions(1)[grouped.visual(1)]])
    text_rows = sequence.num_rows - 10
    assert grouped.num_rows(1) == text_rows + kept_rows.shape[0] + 9 < grouped.num_rows(0)
    for a, b in zip(runs["grouped"].result.logits, runs["expanded"].result.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
