"""Threshold calibration (DyMU's batch-level procedure) and the thresholds file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dymu.calibrate import BatchTopPolicy, calibrate, merges_per_layer, preset_keep, token_counts
from dymu.errors import DymuError
from dymu.merge import Edges
from dymu.thresholds import EncoderFingerprint, Thresholds, ThresholdsError
from dymu.vision.load import VisionModel, load_vision_model


def natural_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Sums of smooth random fields at several scales with random contrast: from near-flat to busy."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        field = torch.zeros(3, 256, 256)
        for cells in (2, 4, 8, 16, 32, 64):
            amplitude = rng.uniform(0, 1) / cells ** rng.uniform(0.3, 1.2)
            noise = torch.from_numpy(rng.normal(size=(1, 3, cells, cells))).float()
            field += amplitude * torch.nn.functional.interpolate(noise, size=(256, 256), mode="bicubic")[0]
        field = field / field.abs().max().clamp_min(1e-3) * rng.uniform(0.2, 1.0)
        images.append(((field.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    return images


@pytest.fixture(scope="module")
def ov(tiny_ov) -> VisionModel:
    return load_vision_model(str(tiny_ov), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def llava(tiny_llava) -> VisionModel:
    return load_vision_model(str(tiny_llava), device="cpu", dtype="float32")


def test_presets_keep_dymus_shares():
    assert [preset_keep(p, 576) for p in ("low", "mid", "high")] == [89, 195, 394]
    assert [preset_keep(p, 729) for p in ("low", "mid", "high")] == [113, 247, 499]
    with pytest.raises(DymuError):
        preset_keep("extreme", 576)


def test_merges_are_split_evenly_over_layers():
    assert merges_per_layer(576, 196, 20) == pytest.approx(19.0)
    for keep in (0, 576, 600):
        with pytest.raises(DymuError):
            merges_per_layer(576, keep, 20)


def test_policy_merges_the_batch_share_and_records_the_next_score():
    policy = BatchTopPolicy(merges_per_image=1.5, num_layers=2)
    edges = Edges(scores=torch.tensor([[0.9, 0.3], [0.8, 0.7]]), targets=torch.zeros(2, 2, dtype=torch.long))
    merge = policy.choose(0, edges)  # 2 images * 1.5 = 3 merges
    assert merge.tolist() == [[True, False], [True, True]]
    assert policy.taus() == [pytest.approx(0.3), 1.0]  # layer 1 recorded nothing: it does not merge


@pytest.mark.parametrize("model", ["ov", "llava"])
def test_calibration_reaches_its_target_on_its_own_data(model, request):
    vision = request.getfixturevalue(model)
    pixels = vision.pixels(natural_images(16))
    encoder = vision.encoder()
    keep = preset_keep("mid", encoder.num_positions)
    taus = calibrate(encoder, pixels.split(4), keep)
    assert len(taus) == encoder.num_layers
    assert all(-1.0 <= t < 1.0 for t in taus)
    counts = token_counts(vision.encoder(taus), pixels.split(4))
    assert abs(np.mean(counts) / keep - 1) < 0.10, (keep, counts)
    assert np.std(counts) > 0  # per-image counts follow content


def test_a_layer_that_records_no_threshold_ends_at_one(ov):
    """A target the late layers cannot reach makes them merge every edge they are offered, so they record
    no threshold: they must end at 1.0 (no merging), not at a threshold that merges all the cap allows."""
    pixels = ov.pixels(natural_images(4, seed=2))
    policy = BatchTopPolicy(merges_per_layer(729, 20, 4), 4)
    ov.encoder().run(pixels, policy)
    silent = [layer for layer, seen in enumerate(policy.observed) if not seen]
    assert silent and silent[0] > 0
    taus = calibrate(ov.encoder(), [pixels], 20)
    assert [taus[layer] for layer in silent] == [1.0] * len(silent)
    assert all(-1.0 <= tau < 1.0 for layer, tau in enumerate(taus) if layer not in silent)


def test_more_tokens_kept_means_higher_thresholds(ov):
    pixels = ov.pixels(natural_images(8, seed=1))
    encoder = ov.encoder()
    low = calibrate(encoder, pixels.split(4), preset_keep("low", 729))
    high = calibrate(encoder, pixels.split(4), preset_keep("high", 729))
    assert sum(high) > sum(low)


def test_an_empty_calibration_set_is_refused(ov):
    with pytest.raises(DymuError, match="empty"):
        calibrate(ov.encoder(), [], 200)


def _thresholds(vision: VisionModel) -> Thresholds:
    encoder = vision.encoder()
    return Thresholds(
        taus=[0.9] * encoder.num_layers,
        model_id=vision.model_id,
        encoder=EncoderFingerprint.of(encoder),
        target_keep=247.0,
        preset="mid",
        calibration={"data": ["photos/"], "images": 16, "samples": 16, "batch_size": 4},
        achieved_mean=250.5,
        achieved_std=40.25,
    )


def test_thresholds_file_round_trip(ov, tmp_path):
    original = _thresholds(ov)
    path = original.save(tmp_path / "t.json")
    data = json.loads(path.read_text())
    assert data["format"] == "dymu-thresholds" and data["version"] == 1
    assert data["model"]["family"] == "siglip" and data["model"]["num_layers"] == 4
    loaded = Thresholds.load(path, EncoderFingerprint.of(ov.encoder()), ov.model_id)
    assert loaded == original


def test_thresholds_for_another_model_are_refused(ov, llava, tmp_path):
    path = _thresholds(ov).save(tmp_path / "ov.json")
    with pytest.raises(ThresholdsError, match="family siglip"):
        Thresholds.load(path, EncoderFingerprint.of(llava.encoder()))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(version=99), "version"),
        (lambda d: d.update(format="other"), "not a dymu thresholds"),
        (lambda d: d.update(taus=[0.9]), "thresholds for an encoder that runs 4"),
        (lambda d: d["model"].pop("patch_size"), "malformed"),
    ],
)
def test_broken_thresholds_files_are_refused(ov, tmp_path, edit, message):
    data = _thresholds(ov).to_json()
    edit(data)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ThresholdsError, match=message):
        Thresholds.load(path)


def test_unreadable_thresholds_files_are_refused(tmp_path):
    with pytest.raises(ThresholdsError, match="no such"):
        Thresholds.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ThresholdsError, match="not a JSON"):
        Thresholds.load(tmp_path / "bad.json")


def test_the_cli_replaces_a_thresholds_file_only_with_overwrite(tiny_ov, tmp_path, capsys):
    """`calibrate --out` over an earlier thresholds file: refused (left as it is) without --overwrite, replaced
    whole with it; no temp file is left beside it."""
    from PIL import Image

    from pipeline.cli import main

    Image.fromarray(natural_images(1)[0]).save(tmp_path / "a.png")
    out = tmp_path / "t.json"
    old = json.dumps(_thresholds(load_vision_model(str(tiny_ov), device="cpu", dtype="float32")).to_json())
    out.write_text(old)
    argv = ["calibrate", "--model", str(tiny_ov), "--data", str(tmp_path / "a.png"), "--keep", "300",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 2
    assert "already holds thresholds; pass --overwrite" in capsys.readouterr().err and out.read_text() == old
    assert main([*argv, "--overwrite"]) == 0
    assert Thresholds.load(out).target_keep == 300.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "t.json"]
