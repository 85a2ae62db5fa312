"""M-RoPE VTU on the Qwen2.5-VL and Qwen3-VL text decoders: with nothing merged it is the stock model at every
position (images and videos, DeepStack included); with merged rows it is closer to the unmerged model than
"no VTU"; positions are the stock model's own."""
from __future__ import annotations

import pytest
import torch

from dymu.errors import DymuError
from dymu.llm import GenerateConfig, KVCache, PruneConfig, generate, load_decoder, prefill
from dymu.llm.mrope import sequence_from_ids, stock_positions
from dymu.tokens import MergedTokens
from tests.llm_models import single_thread, tiny_decoder  # noqa: F401 (fixture)
from tests.qwen_models import END_ID, IMAGE_ID, START_ID, VIDEO_ID, placeholder_ids, random_patches, tiny_qwen_vl

FAMILIES = ["qwen2.5-vl", "qwen3-vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_qwen_vl(request.param)


def empty_cache(decoder, capacity: int = 128) -> KVCache:
    return KVCache(decoder.num_layers, decoder.num_kv_heads, decoder.head_dim, capacity, decoder.device, decoder.dtype)


def video_ids(model, slots: int, per_slot: int) -> torch.Tensor:
    """Qwen2.5-VL: one block of video placeholders; Qwen3-VL: a text 'timestamp' before each slot's block."""
    if model.config.model_type == "qwen2_5_vl":
        return placeholder_ids(4, slots * per_slot, 3, VIDEO_ID)
    parts = [torch.tensor([5, 6, 7])]
    for slot in range(slots):
        parts += [torch.tensor([20 + slot, 21]), torch.tensor([START_ID]), torch.full((per_slot,), VIDEO_ID),
                  torch.tensor([END_ID])]
    parts.append(torch.tensor([8, 9, 10]))
    return torch.cat(parts)


def visual_inputs(model, kind: str):
    """ids, the stock forward's visual kwargs, and our positions for one image (8x12 patches) or a
    4-frame video (2 temporal slots of 8x8 patches, 1.5 s per slot)."""
    if kind == "image":
        grid = torch.tensor([[1, 8, 12]])
        ids = placeholder_ids(5, 24, 4, IMAGE_ID)
        pixels = random_patches(model, (1, 8, 12))
        stock = dict(pixel_values=pixels, image_grid_thw=grid)
        return ids, stock, stock_positions(model, ids, image_grid_thw=grid)
    grid = torch.tensor([[2, 8, 8]])
    ids = video_ids(model, 2, 16)
    pixels = random_patches(model, (2, 8, 8))
    stock = dict(pixel_values_videos=pixels, video_grid_thw=grid)
    seconds = None
    if model.config.model_type == "qwen2_5_vl":
        seconds = [1.5]
        stock["second_per_grid_ts"] = torch.tensor(seconds)
    return ids, stock, stock_positions(model, ids, video_grid_thw=grid, second_per_grid_ts=seconds)


def visual_features(model, stock: dict):
    """The stock visual features (P, D) and DeepStack features (per layer (P, D), Qwen3-VL) of the inputs."""
    with torch.no_grad():
        if "pixel_values" in stock:
            out = model.model.get_image_features(stock["pixel_values"], stock["image_grid_thw"], return_dict=True)
        else:
            out = model.model.get_video_features(stock["pixel_values_videos"], stock["video_grid_thw"],
                                                 return_dict=True)
    deepstack = getattr(out, "deepstack_features", None)
    return torch.cat(out.pooler_output), None if deepstack is None else [torch.cat(f) for f in deepstack]


def stock_logits(model, ids: torch.Tensor, stock: dict) -> torch.Tensor:
    types = torch.zeros_like(ids, dtype=torch.int)
    types[ids == IMAGE_ID], types[ids == VIDEO_ID] = 1, 2
    with torch.no_grad():
        return model(input_ids=ids[None], mm_token_type_ids=types[None], **stock).logits[0]


@pytest.mark.parametrize("kind", ["image", "video"])
def test_unmerged_prefill_equals_stock_model_at_every_position(model, kind):
    ids, stock, positions = visual_inputs(model, kind)
    features, deepstack = visual_features(model, stock)
    assert (deepstack is not None) == (model.config.model_type == "qwen3_vl")
    sequence = sequence_from_ids(model, ids, features, positions, deepstack)
    decoder = load_decoder(model)
    out = prefill(decoder, sequence, empty_cache(decoder), all_logits=True)
    expected = stock_logits(model, ids, stock)
    torch.testing.assert_close(out.position_logits, expected, atol=1e-5, rtol=1e-5)
    assert out.next_position == int(positions.max()) + 1 < ids.shape[0]


def test_positions_are_the_stock_grid(model):
    ids, _, positions = visual_inputs(model, "video")
    visual = ids == VIDEO_ID
    slots = positions[:, visual].view(3, 2, 16)  # 2 temporal slots of 4x4 merged cells, row-major
    for slot in range(2):
        t, h, w = slots[:, slot]
        assert len(set(t.tolist())) == 1
        assert torch.equal(h - h.min(), torch.arange(4).repeat_interleave(4))
        assert torch.equal(w - w.min(), torch.arange(4).repeat(4))
    if model.config.model_type == "qwen2_5_vl":
        # one block; t scaled by tokens_per_second (2) * 1.5 s per slot = 3 per slot
        assert int(slots[0, 1, 0] - slots[0, 0, 0]) == 3
    else:
        # a block per slot after its text timestamp; text resumes at the last block's largest index + 1:
        # <vision_end>, 2 timestamp ids, <vision_start>, then the next slot
        assert int(slots[0, 1, 0]) == (int(slots[:, 0].max()) + 1) + 2 + 1 + 1
    text = positions[:, ~visual]
    assert torch.equal(text[0], text[1]) and torch.equal(text[1], text[2])


def test_decode_continues_the_stock_model(model):
    """Greedy tokens and logits after an unmerged image prompt match transformers' generate."""
    ids, stock, positions = visual_inputs(model, "image")
    features, deepstack = visual_features(model, stock)
    sequence = sequence_from_ids(model, ids, features, positions, deepstack)
    ours = generate(model, sequence, GenerateConfig(max_new_tokens=6, keep_logits=True))
    types = torch.zeros_like(ids, dtype=torch.int)
    types[ids == IMAGE_ID] = 1
    with torch.no_grad():
        theirs = model.generate(input_ids=ids[None], mm_token_type_ids=types[None], max_new_tokens=6,
                                do_sample=False, output_logits=True, return_dict_in_generate=True, **stock)
    assert ours.tokens == theirs.sequences[0, ids.shape[0]:].tolist()
    torch.testing.assert_close(torch.stack(ours.logits), torch.cat(theirs.logits).float(), atol=1e-4, rtol=1e-4)


def merge_groups(features: torch.Tensor, deepstack, seed: int = 0):
    """Merge most runs of 4 neighbouring visual rows, as DToMe merges similar tokens: the rows of a merged
    group are first made near-duplicates (their mean plus a tenth of their spread), which gives the
    "unmerged" reference inputs; the merged tokens hold each group's mean. DeepStack rows likewise."""
    n = features.shape[0]
    group = torch.arange(n) // 4
    merged = torch.rand(int(group.max()) + 1, generator=torch.Generator().manual_seed(seed)) < 0.75
    mapping = torch.unique(torch.where(merged[group], group, n + torch.arange(n)), return_inverse=True)[1]
    u = int(mapping.max()) + 1
    sizes = torch.bincount(mapping, minlength=u)

    def mean(x):
        return torch.zeros(u, x.shape[1]).index_add_(0, mapping, x) / sizes[:, None]

    def near(x):
        centre = mean(x)[mapping]
        return centre + 0.1 * (x - centre)

    tokens = MergedTokens(mean(features), sizes, mapping, [n])
    merged_deepstack = None if deepstack is None else [mean(d) for d in deepstack]
    reference_deepstack = None if deepstack is None else [near(d) for d in deepstack]
    return near(features), reference_deepstack, tokens, merged_deepstack


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("kind", ["image", "video"])
def test_vtu_is_closer_to_the_unmerged_model_than_no_vtu(model, kind):
    ids, stock, positions = visual_inputs(model, kind)
    features, deepstack = visual_features(model, stock)
    near, near_deepstack, merged, merged_deepstack = merge_groups(features, deepstack)
    assert merged.num_unique < 0.5 * features.shape[0]
    decoder = load_decoder(model)
    unmerged = sequence_from_ids(model, ids, near, positions, near_deepstack)
    reference = prefill(decoder, unmerged, empty_cache(decoder), all_logits=True).position_logits
    sequence = sequence_from_ids(model, ids, merged, positions, merged_deepstack)
    tail = torch.arange(ids.shape[0])[~sequence.visual][-4:]  # the last text positions: where the answer starts
    vtu = prefill(decoder, sequence, empty_cache(decoder), all_logits=True).position_logits[tail]
    no_vtu_sequence = sequence.consecutive()
    no_vtu = prefill(decoder, no_vtu_sequence, empty_cache(decoder), all_logits=True).position_logits
    no_vtu = no_vtu[-4:]
    kl_vtu, kl_no_vtu = kl(reference[tail], vtu), kl(reference[tail], no_vtu)
    assert kl_vtu < kl_no_vtu, (kl_vtu, kl_no_vtu)


def test_merged_rows_get_their_deepstack_feature_once_as_the_literal_reference():
    """Rows of known group sizes (3, 2, 2, 2, 1, 3, 1, 2): every position's logits equal a literal float64
    reference in which each merged row gets its DeepStack feature once, not once per position it plays."""
    from tests.deepstack_reference import known_groups_prompt

    model = tiny_qwen_vl("qwen3-vl")
    sequence, reference = known_groups_prompt(model)
    decoder = load_decoder(model)
    ours = prefill(decoder, sequence, empty_cache(decoder), all_logits=True).position_logits
    torch.testing.assert_close(ours.double(), reference, atol=2e-5, rtol=1e-5)


def test_pruning_runs_on_mrope_prompts(model):
    ids, stock, positions = visual_inputs(model, "video")
    features, deepstack = visual_features(model, stock)
    sequence = sequence_from_ids(model, ids, features, positions, deepstack)
    prune = PruneConfig(enabled=True, layer=0, start_step=1, interval=1, min_keep=0.25, sharpness=50.0)
    result = generate(model, sequence, GenerateConfig(max_new_tokens=6, prune=prune))
    assert len(result.tokens) == 6
    assert result.cache_entries[0] > result.cache_entries[-1]  # visual entries were dropped after the probe


def test_bad_inputs_fail_clearly(model):
    ids, stock, positions = visual_inputs(model, "image")
    features, deepstack = visual_features(model, stock)
    with pytest.raises(DymuError, match="placeholders"):
        sequence_from_ids(model, ids, features[:-1], positions, deepstack)
    with pytest.raises(DymuError, match="positions must be"):
        sequence_from_ids(model, ids, features, positions[:2], deepstack)
    if deepstack is not None:
        with pytest.raises(DymuError, match="deepstack"):
            sequence_from_ids(model, ids, features, positions, [d[:-1] for d in deepstack])
    sequence = sequence_from_ids(model, ids, features, positions, deepstack)
    with pytest.raises(DymuError, match="expanded"):
        generate(model, sequence, GenerateConfig(max_new_tokens=2, kv_cache="grouped"))
    with pytest.raises(DymuError, match="1-D RoPE"):
        prefill(load_decoder(tiny_decoder("qwen2")), sequence, empty_cache(load_decoder(model)))
    with pytest.raises(DymuError, match="grids"):
        stock_positions(model, ids, image_grid_thw=torch.tensor([[1, 4, 4]]))


def test_text_positions_reach_the_rotary_module_as_three_equal_rows(model):
    """transformers 5.17's Qwen-VL rotary modules index (3, batch, n) position ids and fail on (1, n)."""
    from dymu.llm.decoder import rope_tables

    decoder = load_decoder(model)
    seen = []
    handle = decoder.rotary_emb.register_forward_hook(lambda module, args, out: seen.append(args[1]))
    try:
        cos, sin = rope_tables(decoder, torch.arange(5))
    finally:
        handle.remove()
    assert seen[0].shape == (3, 1, 5) and torch.equal(seen[0][0, 0], seen[0][2, 0])
    assert cos.shape == sin.shape == (5, decoder.head_dim)
    cos3, _ = rope_tables(decoder, torch.arange(5).expand(3, -1))
    assert torch.equal(cos, cos3)
