"""`dymu-video calibrate` and `dymu-video tokens` end to end on the tiny checkpoints, bad input included."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dymu.thresholds import Thresholds
from pipeline.cli import main
from tests import media


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A folder with a flat image, a noisy one, a textured one, a short video and a file to skip."""
    folder = tmp_path_factory.mktemp("calibration")
    rng = np.random.default_rng(0)
    Image.new("RGB", (400, 300), (90, 120, 200)).save(folder / "flat.png")
    Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.fromarray(media.textured_frame(384, seed=1)).save(folder / "textured.jpg")
    media.static_video(folder / "clip.mp4", num_frames=6, size=128)
    (folder / "README.txt").write_text("not media: a directory listing skips it")
    return folder


@pytest.fixture(scope="module")
def ov_thresholds(tiny_ov, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("thresholds") / "ov-mid.json"
    code = main([
        "calibrate", "--model", str(tiny_ov), "--data", str(data), "--preset", "mid", "--out", str(out),
        "--batch-size", "4", "--frames-per-video", "3", "--device", "cpu",
    ])
    assert code == 0
    return out


def _fails_with(capsys, argv: list[str], message: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert any(message in line for line in err), err
    assert not any("Traceback" in line for line in err)


def test_calibrate_writes_a_thresholds_file(ov_thresholds, tiny_ov, capsys):
    thresholds = Thresholds.load(ov_thresholds)
    assert thresholds.model_id == str(tiny_ov)
    assert thresholds.preset == "mid" and thresholds.target_keep == 247
    assert len(thresholds.taus) == 4
    calibration = thresholds.calibration
    assert (calibration["images"], calibration["videos"], calibration["samples"]) == (3, 1, 6)
    assert 0 < thresholds.achieved_mean < 729 and thresholds.achieved_std > 0


def test_calibrate_prints_the_achieved_tokens(tiny_llava, data, tmp_path, capsys):
    out = tmp_path / "llava.json"
    code = main([
        "calibrate", "--model", str(tiny_llava), "--data", str(data / "flat.png"), str(data / "noise.png"),
        "--keep", "300", "--out", str(out), "--device", "cpu",
    ])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "target 300 tokens of 576 per image; achieved" in stdout
    thresholds = Thresholds.load(out)
    assert thresholds.encoder.family == "clip" and thresholds.encoder.feature_layer == -2
    assert len(thresholds.taus) == 3 and thresholds.preset is None


def test_tokens_reports_each_image_and_frame(ov_thresholds, tiny_ov, data, capsys):
    capsys.readouterr()
    code = main([
        "tokens", "--model", str(tiny_ov), "--thresholds", str(ov_thresholds), "--json", "--frames-per-video", "4",
        str(data / "flat.png"), str(data / "noise.png"), str(data / "clip.mp4"),
    ])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    items = report["items"]
    assert [Path(i["path"]).name for i in items] == ["flat.png", "noise.png"] + ["clip.mp4"] * 4
    assert all(i["before"] == 729 for i in items)
    assert [i["frame"] for i in items[2:]] == [0, 1, 2, 3]
    assert items[0]["after"] * 3 < items[1]["after"]  # the flat image is far cheaper than noise
    assert report["total"]["after"] == sum(i["after"] for i in items)


def test_tokens_prints_a_table(ov_thresholds, tiny_ov, data, capsys):
    capsys.readouterr()
    assert main(["tokens", "--model", str(tiny_ov), "--thresholds", str(ov_thresholds), str(data / "flat.png")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["path", "frame", "time", "before", "after"]
    assert lines[1].split()[:4] == [str(data / "flat.png"), "-", "-", "729"]
    assert lines[-1].startswith("total: 729 -> ")


def test_missing_file(ov_thresholds, tiny_ov, tmp_path, capsys):
    missing = tmp_path / "nope.jpg"
    _fails_with(capsys, ["tokens", "--model", str(tiny_ov), "--thresholds", str(ov_thresholds), str(missing)],
                "no such file")


def test_not_an_image_or_video(ov_thresholds, tiny_ov, data, capsys):
    _fails_with(capsys, ["tokens", "--model", str(tiny_ov), "--thresholds", str(ov_thresholds),
                         str(data / "README.txt")], "neither an image nor a video")


def test_empty_calibration_set(tiny_ov, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails_with(capsys, ["calibrate", "--model", str(tiny_ov), "--data", str(empty), "--keep", "100",
                         "--out", str(tmp_path / "t.json")], "calibration set is empty")


def test_thresholds_made_for_another_model(ov_thresholds, tiny_llava, data, capsys):
    _fails_with(capsys, ["tokens", "--model", str(tiny_llava), "--thresholds", str(ov_thresholds),
                         str(data / "flat.png")], "do not fit this model")


def test_a_file_that_is_not_a_thresholds_file(tiny_ov, data, capsys):
    _fails_with(capsys, ["tokens", "--model", str(tiny_ov), "--thresholds", str(data / "flat.png"),
                         str(data / "flat.png")], "not a JSON thresholds file")


def test_a_model_that_is_not_cached_offline(ov_thresholds, data, capsys):
    # conftest sets HF_HUB_OFFLINE=1 before the hub client is imported
    _fails_with(capsys, ["tokens", "--model", "nobody/no-such-model-dymu", "--thresholds", str(ov_thresholds),
                         str(data / "flat.png")], "not in the local Hugging Face cache")


def test_an_impossible_target(tiny_ov, data, tmp_path, capsys):
    _fails_with(capsys, ["calibrate", "--model", str(tiny_ov), "--data", str(data / "flat.png"), "--keep", "800",
                         "--out", str(tmp_path / "t.json")], "between 1 and 728")
