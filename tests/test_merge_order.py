"""DToMe's merge order: positional (default) against the authors' order, from the merge step to the CLI,
and the calibrate command reaching its target on its own data."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dymu.calibrate import calibrate, preset_keep
from dymu.config import make_config
from dymu.errors import DymuError
from dymu.merge import Edges, initial_state, merge_tokens
from dymu.thresholds import Thresholds
from dymu.thresholds_store import calibrate_and_cache, find_thresholds
from dymu.vision import DToMeEncoder
from dymu.vision.load import VisionModel, load_vision_model
from pipeline.cli import build_parser, main
from pipeline.commands.ask import config_overrides
from tests.test_calibrate import natural_images


@pytest.fixture(scope="module")
def ov(tiny_ov) -> VisionModel:
    return load_vision_model(str(tiny_ov), device="cpu", dtype="float32")


def test_authors_order_puts_unmerged_a_rows_by_score_then_b_rows():
    x = torch.arange(8.0)[None, :, None]  # rows 0..7: A = 0, 2, 4, 6 and B = 1, 3, 5, 7
    state = initial_state(x)
    edges = Edges(scores=torch.tensor([[0.2, 0.9, 0.5, 0.7]]), targets=torch.tensor([[0, 0, 3, 2]]))
    merge = torch.tensor([[False, True, False, False]])  # row 2 -> row 1
    authors = merge_tokens(state, edges, merge, "authors")
    # Unmerged A rows 6 (0.7), 4 (0.5), 0 (0.2), then B rows 1 (with 2), 3, 5, 7.
    assert authors.x[:, 0].tolist() == [6.0, 4.0, 0.0, 1.5, 3.0, 5.0, 7.0]
    assert authors.mapping.tolist() == [[2, 3, 3, 4, 1, 5, 0, 6]]
    positional = merge_tokens(state, edges, merge)
    assert positional.x[:, 0].tolist() == [0.0, 1.5, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert positional.mapping.tolist() == [[0, 1, 1, 2, 3, 4, 5, 6]]


def canonical(image) -> torch.Tensor:
    """A partition as the first position of each position's group (independent of row order)."""
    first = torch.full((image.num_tokens,), image.mapping.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, image.mapping, torch.arange(image.mapping.shape[0]), "amin")
    return first[image.mapping]


def test_orders_agree_through_the_first_merging_layer_then_differ(ov):
    """Same taus, same images: the first layer that merges merges alike in both orders (the order only
    decides the next layer's pairs); after it the partitions differ, the token counts only a little."""
    pixels = ov.pixels(natural_images(8, seed=3))
    taus = calibrate(ov.encoder(), pixels.split(4), preset_keep("mid", 729))
    assert taus[0] < 1.0  # layer 0 merges
    first = {order: DToMeEncoder(ov.tower, taus[:1], feature_layer=1, merge_order=order)(pixels)
             for order in ("positional", "authors")}
    final = {order: ov.encoder(taus, merge_order=order)(pixels) for order in ("positional", "authors")}
    differ, gaps = 0, []
    for i in range(len(pixels)):
        assert torch.equal(canonical(first["positional"][i]), canonical(first["authors"][i]))
        ours, theirs = final["positional"][i], final["authors"][i]
        differ += not torch.equal(canonical(ours), canonical(theirs))
        gaps.append(theirs.num_tokens - ours.num_tokens)
    assert differ >= len(pixels) // 2
    # Per image within 3% of the 729 positions (this tiny random tower: -15..+12), on average within a few.
    assert max(map(abs, gaps)) <= 0.03 * 729 and abs(sum(gaps) / len(gaps)) <= 5, gaps


def test_merge_order_is_a_config_option_that_names_the_tokens(tmp_path):
    positional = make_config("mid")
    authors = make_config("mid", merge_order="authors")
    assert positional.merge_order == "positional" and authors.merge_order == "authors"
    assert positional.encoder_fingerprint() != authors.encoder_fingerprint()  # another cache key
    (tmp_path / "c.yaml").write_text("merge_order: authors\n")
    assert make_config(config_file=tmp_path / "c.yaml").merge_order == "authors"
    with pytest.raises(DymuError, match="merge_order"):
        make_config(merge_order="random")
    args = build_parser().parse_args(["ask", "clip.mp4", "What?", "--merge-order", "authors"])
    assert make_config(args.preset, None, **config_overrides(args)).merge_order == "authors"
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["ask", "clip.mp4", "What?", "--merge-order", "random"])
    assert exit_info.value.code == 2


def test_an_unknown_merge_order_is_refused(ov):
    with pytest.raises(DymuError, match="merge order"):
        DToMeEncoder(ov.tower, merge_order="random")


def test_cached_thresholds_are_kept_apart_per_merge_order(ov, tmp_path, monkeypatch):
    monkeypatch.setenv("DYMU_CACHE", str(tmp_path))
    pixels = ov.pixels(natural_images(4, seed=5))
    authors = ov.encoder(merge_order="authors")
    saved = calibrate_and_cache("tiny", authors, 247, pixels, "frames")
    assert saved.calibration["merge_order"] == "authors"
    assert find_thresholds("tiny", ov.encoder(merge_order="authors"), 247) is not None
    assert find_thresholds("tiny", ov.encoder(), 247) is None  # positional needs thresholds of its own


@pytest.mark.parametrize("model, order", [("tiny_ov", "positional"), ("tiny_llava", "positional"),
                                          ("tiny_ov", "authors")])
def test_calibrate_command_reaches_its_target_on_its_own_data(model, order, request, tmp_path, capsys):
    checkpoint = request.getfixturevalue(model)
    data = tmp_path / "data"
    data.mkdir()
    for i, image in enumerate(natural_images(12, seed=11)):
        Image.fromarray(image).save(data / f"{i:02d}.png")
    out = tmp_path / "t.json"
    assert main(["calibrate", "--model", str(checkpoint), "--data", str(data), "--preset", "mid", "--out", str(out),
                 "--batch-size", "4", "--device", "cpu", "--merge-order", order]) == 0
    thresholds = Thresholds.load(out)
    assert thresholds.calibration["merge_order"] == order
    assert abs(thresholds.achieved_mean / thresholds.target_keep - 1) < 0.10, thresholds.achieved_mean
    capsys.readouterr()
    # `tokens` applies the file with the order it was calibrated with, and counts what calibrate measured.
    assert main(["tokens", "--model", str(checkpoint), "--thresholds", str(out), str(data), "--json",
                 "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    counts = [item["after"] for item in report["items"]]
    assert sum(counts) / len(counts) == pytest.approx(thresholds.achieved_mean)


def test_videoqa_encodes_with_the_configured_merge_order(tiny_ov, tmp_path, monkeypatch):
    from dymu.videoqa import VideoQA
    from tests.media import changing_video

    monkeypatch.setenv("DYMU_CACHE", str(tmp_path / "cache"))
    video = changing_video(tmp_path / "clip.mp4", num_frames=4, size=96)
    qa = VideoQA.from_pretrained(str(tiny_ov), preset="mid", merge_order="authors", num_frames=4, device="cpu",
                                 dtype="float32")
    tokens = qa.encode(qa.read(video))
    assert qa.visual_tokenizer().encoder.merge_order == "authors"
    assert tokens.config_hash == make_config("mid", model=str(tiny_ov), merge_order="authors", num_frames=4,
                                             device="cpu", dtype="float32").encoder_fingerprint()
    saved = list((tmp_path / "cache" / "thresholds").glob("*.json"))
    assert len(saved) == 1 and saved[0].stem.endswith("-authors")
    assert Thresholds.load(saved[0]).calibration["merge_order"] == "authors"
