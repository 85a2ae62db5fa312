"""The virtual layout reproduces the stock model's encoder-to-LLM sequence exactly, and shares rows
between positions whose composition is identical."""
from __future__ import annotations

import pytest
import torch

from dymu.layout import append_learned_row, compose, identity_map, probe_position_map
from dymu.temporal import concatenate_frames
from dymu.tokens import MergedTokens


@pytest.fixture(scope="module")
def ov_model(tiny_ov):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_ov).eval()


def _unmerged(features: torch.Tensor) -> MergedTokens:
    frames, per_frame, _ = features.shape
    n = frames * per_frame
    return MergedTokens(features.reshape(n, -1), torch.ones(n, dtype=torch.long), torch.arange(n), [per_frame] * frames)


@torch.no_grad()
def test_video_layout_matches_stock_video_features(ov_model):
    frames = 3
    pixels = torch.randn(1, frames, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    stock = ov_model.model.get_video_features(
        pixels, vision_feature_layer=-1, vision_feature_select_strategy="full", output_hidden_states=True
    ).pooler_output[0]
    hidden = ov_model.model.vision_tower(pixels[0], output_hidden_states=True).hidden_states[-1]
    frame_map = probe_position_map(lambda x: ov_model.model.apply_pooling(x.view(1, 729, -1))[0], 729)
    assert frame_map.num_outputs == 196  # 27x27 pooled to 14x14
    per_frame = [compose(_unmerged(h[None]), frame_map, ov_model.model.multi_modal_projector) for h in hidden]
    out = append_learned_row(concatenate_frames(per_frame), ov_model.model.image_newline)
    out.validate()
    assert out.num_positions == stock.shape[0] == frames * 196 + 1
    torch.testing.assert_close(out.embeds[out.mapping], stock, atol=1e-5, rtol=1e-5)
    assert out.positions_per_frame == [196, 196, 197]


@torch.no_grad()
def test_identical_compositions_share_one_row(ov_model):
    dim = ov_model.config.vision_config.hidden_size
    frame_map = probe_position_map(lambda x: ov_model.model.apply_pooling(x.view(1, 729, -1))[0], 729)
    # Left half of the frame one merged token, right half another.
    col = torch.arange(729) % 27
    mapping = (col >= 14).long()
    tokens = MergedTokens(torch.randn(2, dim), torch.bincount(mapping), mapping, [729])
    out = compose(tokens, frame_map, ov_model.model.multi_modal_projector)
    out.validate()
    # Pure-left cells, pure-right cells, and one boundary column of mixed cells at most.
    assert 2 < out.num_unique <= 2 + 14
    left = ov_model.model.multi_modal_projector(tokens.embeds[:1])[0]
    torch.testing.assert_close(out.embeds[out.mapping[0]], left)


@torch.no_grad()
def test_anyres_image_layout_matches_stock_image_features(tiny_ov):
    import numpy as np
    from PIL import Image

    from dymu.families import load_family

    family = load_family(str(tiny_ov), "cpu", "float32")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    pixels, position_map = family.image_pixels(image)
    sizes = torch.tensor([[300, 500]])
    stock = family.model.model.get_image_features(
        pixels[None], sizes, vision_feature_layer=-1, vision_feature_select_strategy="full", output_hidden_states=True
    ).pooler_output[0]
    hidden = family.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
    out = compose(_unmerged(hidden), position_map, family.project, family.newline)
    assert out.num_positions == stock.shape[0]
    torch.testing.assert_close(out.embeds[out.mapping], stock, atol=1e-5, rtol=1e-5)


def test_appended_learned_row_counts_with_the_last_frame():
    tokens = _unmerged(torch.randn(2, 3, 4))
    out = append_learned_row(tokens, torch.full((4,), 7.0)).validate()
    assert out.positions_per_frame == [3, 4] and out.num_unique == 7
    assert torch.equal(out.embeds[out.mapping[-1]], torch.full((4,), 7.0))


def test_identity_map_keeps_every_position():
    tokens = _unmerged(torch.randn(1, 576, 8))
    out = compose(tokens, identity_map(576), lambda x: 2 * x)
    assert out.num_unique == 576
    torch.testing.assert_close(out.embeds[out.mapping], 2 * tokens.embeds)


def test_wrong_position_count_is_refused():
    with pytest.raises(ValueError, match="576"):
        compose(_unmerged(torch.randn(1, 575, 8)), identity_map(576), lambda x: x)
