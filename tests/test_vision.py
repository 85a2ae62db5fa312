"""DToMe in the SigLIP and CLIP towers of the tiny checkpoints, loaded through transformers' from_pretrained."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from dymu.errors import DymuError
from dymu.vision import DToMeEncoder, frames_to_tokens, layers_to_run, runner
from dymu.vision.load import VisionModel, load_vision_model
from tests import media


@pytest.fixture(scope="module")
def ov(tiny_ov) -> VisionModel:
    return load_vision_model(str(tiny_ov), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def llava(tiny_llava) -> VisionModel:
    return load_vision_model(str(tiny_llava), device="cpu", dtype="float32")


@pytest.fixture(params=["ov", "llava"])
def vision(request) -> VisionModel:
    return request.getfixturevalue(request.param)


def _frames() -> list[np.ndarray]:
    """A flat sky-blue image, a smooth textured one and pure noise, of different sizes."""
    flat = np.zeros((300, 400, 3), np.uint8)
    flat[:] = (90, 120, 200)
    noise = np.random.default_rng(0).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    return [flat, media.textured_frame(384, seed=3), noise]


def _stock_features(vision: VisionModel, pixels: torch.Tensor) -> torch.Tensor:
    weight = next(vision.tower.parameters())
    with torch.no_grad():
        out = vision.tower(pixels.to(weight.dtype), output_hidden_states=True)
    features = out.hidden_states[vision.feature_layer]
    return features[:, 1:] if vision.drop_cls else features


def _taus(vision: VisionModel, tau: float) -> list[float]:
    return [tau] * vision.encoder().num_layers


def test_checkpoints_have_the_expected_geometry(ov, llava):
    assert (ov.encoder().family, ov.encoder().num_positions, ov.drop_cls) == ("siglip", 729, False)
    assert (llava.encoder().family, llava.encoder().num_positions, llava.drop_cls) == ("clip", 576, True)
    assert llava.encoder().num_layers == len(llava.tower.encoder.layers) - 1  # feature layer -2


def test_no_merging_gives_the_stock_features(vision):
    pixels = vision.pixels(_frames())
    stock = _stock_features(vision, pixels)
    batched = vision.encoder()(pixels)
    for i, image in enumerate(batched):
        assert image.num_tokens == vision.encoder().num_positions
        assert torch.allclose(image.features, stock[i], atol=1e-5, rtol=1e-5)
        assert torch.equal(image.mapping, torch.arange(image.num_tokens))
        single = vision.encoder()(pixels[i : i + 1])[0]
        assert torch.allclose(single.features, stock[i], atol=1e-5, rtol=1e-5)


def test_no_merging_gives_the_stock_features_in_bfloat16(ov):
    tower = copy.deepcopy(ov.tower).to(torch.bfloat16)
    vision = VisionModel(ov.model_id, tower, ov.feature_layer, ov.drop_cls, ov.image_mean, ov.image_std)
    pixels = vision.pixels(_frames())
    results = vision.encoder()(pixels)
    stock = _stock_features(vision, pixels)
    assert results[0].features.dtype == torch.bfloat16
    for image, expected in zip(results, stock):
        assert torch.allclose(image.features.float(), expected.float(), atol=2e-2, rtol=2e-2)
    merged = vision.encoder(_taus(vision, 0.9))(pixels)
    assert merged[0].num_tokens < merged[2].num_tokens
    for image in merged:
        image.to_tokens().validate()


def test_the_feature_layer_decides_how_many_layers_run(ov):
    pixels = ov.pixels(_frames()[:1])
    with torch.no_grad():
        hidden = ov.tower(pixels, output_hidden_states=True).hidden_states
    encoder = DToMeEncoder(ov.tower, feature_layer=1)
    assert encoder.num_layers == 1
    assert torch.allclose(encoder(pixels)[0].features, hidden[1][0], atol=1e-5)
    assert layers_to_run(-1, 4) == 4 and layers_to_run(-2, 4) == 3 and layers_to_run(4, 4) == 4
    with pytest.raises(DymuError):
        layers_to_run(5, 4)


def test_merged_results_keep_the_contract(vision):
    pixels = vision.pixels(_frames())
    encoder = vision.encoder(_taus(vision, 0.9))
    for image in encoder(pixels):
        assert image.num_tokens < encoder.num_positions
        assert int(image.sizes.sum()) == encoder.num_positions
        counts = torch.bincount(image.mapping, minlength=image.num_tokens)
        assert torch.equal(counts, image.sizes)  # every position in exactly one row, every row used
        image.to_tokens(timestamp=0.5).validate()


def test_cls_is_never_merged(llava):
    encoder = DToMeEncoder(llava.tower, _taus(llava, -1.0), llava.feature_layer, drop_cls=False)
    assert encoder.num_positions == 577
    for image in encoder(llava.pixels(_frames())):
        assert image.sizes[0].item() == 1
        assert (image.mapping == 0).nonzero().flatten().tolist() == [0]
        assert image.num_tokens == 1 + 576 // 2**encoder.num_layers  # everything else halves each layer


def test_flat_images_get_far_fewer_tokens_than_textured_ones(vision):
    flat, _, noise = vision.encoder(_taus(vision, 0.9))(vision.pixels(_frames()))
    assert flat.num_tokens * 4 < noise.num_tokens


@pytest.mark.parametrize("max_waste", [0.0, float("inf")], ids=["attention-per-image", "attention-padded"])
def test_batched_and_single_runs_agree(vision, max_waste, monkeypatch):
    monkeypatch.setattr(runner, "PADDED_ATTENTION_MAX_WASTE", max_waste)
    pixels = vision.pixels(_frames())
    encoder = vision.encoder(_taus(vision, 0.9))
    batched = encoder(pixels)
    assert len({image.num_tokens for image in batched}) > 1  # the batch really needed padding
    for i, image in enumerate(batched):
        single = encoder(pixels[i : i + 1])[0]
        assert single.num_tokens == image.num_tokens
        assert torch.equal(single.mapping, image.mapping)
        assert torch.allclose(single.features, image.features, atol=1e-4, rtol=1e-4)


def test_frames_stack_into_one_value(ov):
    images = ov.encoder(_taus(ov, 0.9))(ov.pixels(_frames()))
    tokens = frames_to_tokens(images, timestamps=[0.0, 0.5, 1.0]).validate()
    assert tokens.positions_per_frame == [729] * 3
    assert tokens.num_unique == sum(image.num_tokens for image in images)
    assert tokens.rows_per_frame() == [image.num_tokens for image in images]


def test_bad_configurations_are_refused(ov):
    with pytest.raises(DymuError, match="thresholds"):
        DToMeEncoder(ov.tower, taus=[0.9], feature_layer=-1)
    with pytest.raises(DymuError, match="no DToMe adapter"):
        DToMeEncoder(nn.Linear(2, 2))
