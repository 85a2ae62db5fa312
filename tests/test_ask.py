"""End to end: `dymu-video ask` and VideoQA on tiny checkpoints, videos and images, good and bad input."""
from __future__ import annotations

import json

import pytest
import torch

from media import audio_only_file, changing_video, empty_video, flat_video, static_video, textured_image, truncated_copy
from pipeline.cli import main
from dymu.errors import DymuError
from dymu.videoqa import VideoQA


@pytest.fixture(autouse=True)
def _shared_runtime(ray_local, redis_server, monkeypatch):
    """`ask` runs through the Ray pipeline: share the session's Ray and Redis instead of starting new ones."""
    monkeypatch.setenv("REDIS_URL", redis_server.url)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return {
        "static": static_video(root / "static.mp4", num_frames=8, size=96),
        "changing": changing_video(root / "changing.mp4", num_frames=8, size=96),
        "flat": flat_video(root / "flat.mp4", num_frames=8, size=96),
        "image": textured_image(root / "photo.png", size=96),
    }


@pytest.fixture(scope="module")
def qa_off(tiny_ov):
    return VideoQA.from_pretrained(str(tiny_ov), preset="off", num_frames=4, max_new_tokens=32)


@pytest.fixture(scope="module")
def qa_mid(tiny_ov, videos, tmp_path_factory):
    qa = VideoQA.from_pretrained(str(tiny_ov), preset="mid", num_frames=8, max_new_tokens=8)
    # Thresholds calibrated once on a mix of content, then shared by every comparison below.
    qa.visual_tokenizer(qa.read(videos["changing"]))
    return qa


def test_preset_off_is_token_for_token_transformers_generate(qa_off, videos):
    answer = qa_off.ask(videos["changing"], "What is happening in the video?")
    family = qa_off.family
    media = qa_off.read(videos["changing"])
    prompt = family.prompt("What is happening in the video?", "video")
    frames = len(media.frames)
    video_tokens = [family.config.video_token_index] * (frames * 196 + 1)
    input_ids = torch.tensor([prompt.before + video_tokens + prompt.after])
    with torch.no_grad():
        out = family.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values_videos=family.frame_pixels(media.frames)[None],
            max_new_tokens=32,
            do_sample=False,
        )
    expected = out[0, input_ids.shape[1] :].tolist()
    assert answer.tokens == expected[: len(answer.tokens)]
    assert len(answer.tokens) == len(expected)
    assert answer.report["llm"]["rows_fed"] == answer.report["llm"]["virtual_length"]  # nothing merged


def test_static_video_costs_far_fewer_tokens_than_a_changing_one(qa_mid, videos):
    static = qa_mid.encode(qa_mid.read(videos["static"]))
    changing = qa_mid.encode(qa_mid.read(videos["changing"]))
    static_rows = sum(static.meta["stages"]["temporal_rows_per_frame"])
    changing_rows = sum(changing.meta["stages"]["temporal_rows_per_frame"])
    assert static_rows < 0.4 * changing_rows
    assert static.num_unique < changing.num_unique  # fewer LLM rows too
    assert static.meta["stages"]["encoded_frames"] == 1  # the others reuse the first frame's encoding
    assert changing.meta["stages"]["encoded_frames"] == 8
    assert static.num_positions == changing.num_positions == 8 * 196 + 1  # same virtual length


def test_flat_video_costs_fewer_tokens_than_a_textured_one(qa_mid, videos):
    flat = qa_mid.encode(qa_mid.read(videos["flat"]))
    textured = qa_mid.encode(qa_mid.read(videos["changing"]))
    flat_dtome = flat.meta["stages"]["dtome_tokens_per_frame"]
    textured_dtome = textured.meta["stages"]["dtome_tokens_per_frame"]
    assert sum(flat_dtome) < 0.5 * sum(textured_dtome)


def test_ask_cli_streams_the_answer_then_a_report(tiny_ov, videos, capsys):
    rc = main(["ask", str(videos["static"]), "What is shown?", "--model", str(tiny_ov), "--frames", "4",
               "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "4 frame(s) sampled" in out and "preset mid" in out
    assert "after DToMe" in out and "after temporal merging" in out and "virtual positions" in out


def test_ask_cli_json(tiny_ov, videos, capsys):
    rc = main(["ask", str(videos["static"]), "What is shown?", "--model", str(tiny_ov), "--frames", "4",
               "--max-new-tokens", "6", "--json", "--no-prune", "--temporal-threshold", "1.0"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames"] == 4 and len(report["tokens"]["dtome_per_frame"]) == 4
    # Temporal merging off: every frame's LLM rows stay rows of their own.
    assert report["tokens"]["temporal_new_per_frame"] == report["tokens"]["llm_rows_per_frame"]
    assert report["llm"]["visual_kv_trace"] == []  # pruning off
    assert report["llm"]["prefix_cache"] == "miss" and report["seconds"]["prefill"] > 0
    assert report["llm"]["answer_tokens"] == 6 or report["llm"]["stop_reason"] == "eos"


@pytest.mark.parametrize("family_fixture", ["tiny_ov", "tiny_llava"])
def test_image_question_works_for_both_families(family_fixture, videos, request, capsys):
    model = request.getfixturevalue(family_fixture)
    rc = main(["ask", str(videos["image"]), "What is in the picture?", "--model", str(model), "--json",
               "--max-new-tokens", "4"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "image"
    if family_fixture == "tiny_llava":
        assert report["tokens"]["encoder_per_frame"] == 576 and report["tokens"]["llm_visual_positions"] == 576
    else:
        assert report["tokens"]["llm_visual_positions"] > 729  # AnyRes: base image plus crops, with newlines


def test_llava_refuses_video_clearly(tiny_llava, videos, capsys):
    assert main(["ask", str(videos["static"]), "q", "--model", str(tiny_llava)]) == 2
    assert "images only" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda d: d / "missing.mp4", "no such file"),
        (lambda d: (d / "notes.mp4").write_text("just some text") and d / "notes.mp4", "not"),
        (lambda d: truncated_copy(static_video(d / "ok.mp4", num_frames=16), d / "cut.mp4", 0.4), ""),
        (lambda d: audio_only_file(d / "voice.m4a"), "video stream"),
        (lambda d: empty_video(d / "empty.mp4"), ""),
    ],
    ids=["missing", "not-a-video", "truncated", "audio-only", "no-frames"],
)
def test_bad_input_is_one_clear_line_and_exit_2(tiny_ov, tmp_path, capsys, make_bad, message):
    path = make_bad(tmp_path)
    rc = main(["ask", str(path), "What?", "--model", str(tiny_ov), "--frames", "4"])
    err = capsys.readouterr().err.strip()
    print(err)
    assert rc == 2
    assert err.startswith("dymu-video ask: error:") and len(err.splitlines()) == 1
    assert message in err


def test_zero_frames_requested_is_refused(tiny_ov, videos, capsys):
    assert main(["ask", str(videos["static"]), "What?", "--model", str(tiny_ov), "--frames", "0"]) == 2
    assert "num_frames" in capsys.readouterr().err


def test_an_empty_question_is_refused_by_the_python_api(qa_off, videos):
    tokens = qa_off.encode(qa_off.read(videos["image"]))
    with pytest.raises(DymuError, match="the question is empty"):
        qa_off.answer(tokens, " \n")


def test_question_longer_than_the_context_is_refused(tiny_llava, videos, capsys):
    question = "describe " * 5000  # the tiny LLaVA has a 4096-position context
    assert main(["ask", str(videos["image"]), question, "--model", str(tiny_llava)]) == 2
    err = capsys.readouterr().err
    assert "4096" in err and len(err.strip().splitlines()) == 1


def test_default_model_offline_names_make_tiny_model(videos, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the real checkpoint is not cached on test machines
    assert main(["ask", str(videos["static"]), "What?"]) == 2
    err = capsys.readouterr().err
    assert "llava-hf/llava-onevision-qwen2-0.5b-ov-hf" in err and "make-tiny-model" in err
