"""Qwen-VL frames and timestamps against the models' own processors, and `calibrate` / `tokens` on the tiny
Qwen2.5-VL and Qwen3-VL checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dymu.errors import DymuError
from dymu.frames import read_video_frames
from dymu.thresholds import Thresholds, ThresholdsError
from dymu.vision.load import load_vision_model
from dymu.vision.qwen_inputs import image_inputs, qwen_frame_count, slot_times, video_inputs
from pipeline.cli import main
from tests import media


@pytest.fixture(scope="module")
def processors(tiny_qwen25, tiny_qwen3):
    from transformers import AutoProcessor

    return {"qwen2.5-vl": AutoProcessor.from_pretrained(tiny_qwen25),
            "qwen3-vl": AutoProcessor.from_pretrained(tiny_qwen3)}


@pytest.mark.parametrize(("total", "video_fps"), [(300, 30.0), (31, 24.0), (7, 8.0), (5000, 25.0), (9, 2.0), (45, 10.0)])
def test_frame_count_is_the_processors_fps_rule(processors, total, video_fps):
    from transformers.video_utils import VideoMetadata

    video_processor = processors["qwen2.5-vl"].video_processor
    expected = len(video_processor.sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps), fps=2.0))
    count = qwen_frame_count(total, video_fps)
    assert count == expected and count % 2 == 0
    assert count == min(max(4, int(total / video_fps * 2) // 2 * 2), total // 2 * 2, 768)


def test_frame_count_takes_a_one_frame_video_and_refuses_none():
    assert qwen_frame_count(1, 30.0) == 1  # video_inputs repeats it into a slot
    with pytest.raises(DymuError, match="at least one frame"):
        qwen_frame_count(0, 30.0)
    with pytest.raises(DymuError, match="positive frame rate"):
        qwen_frame_count(100, 0.0)


def test_one_frame_fills_a_slot_as_the_processor_pairs_frames(processors, tmp_path):
    """One frame is given twice (Qwen3-VL's processor refuses one); an odd count from three up is given as it
    is (the processor repeats the last frame itself, and sizes the frames by their count)."""
    frames = np.stack([media.textured_frame(96, seed=i) for i in range(3)])
    for family, processor in processors.items():
        one = video_inputs(processor, frames[:1], [0.5])
        twice = processor.video_processor(videos=[np.concatenate([frames[:1]] * 2)], do_sample_frames=False,
                                          return_tensors="pt")
        assert one.grid_thw[0, 0] == 1 and torch.equal(one.grid_thw, twice["video_grid_thw"]), family
        torch.testing.assert_close(one.pixel_values, twice["pixel_values_videos"])
        assert one.slot_timestamps == [[0.5]] and one.seconds_per_slot == [0.0]
        three = video_inputs(processor, frames, [0.0, 1.0, 2.0])
        stock = processor.video_processor(videos=[frames], do_sample_frames=False, return_tensors="pt")
        torch.testing.assert_close(three.pixel_values, stock["pixel_values_videos"])
        assert three.slot_timestamps == [[0.5, 2.0]]
    path = media.changing_video(tmp_path / "one.mp4", num_frames=1, size=96)
    from dymu.vision.qwen_inputs import read_video_inputs

    assert int(read_video_inputs(processors["qwen3-vl"], path).grid_thw[0, 0]) == 1


def test_slot_times_and_seconds_match_the_processors(processors, tmp_path):
    from transformers.video_utils import VideoMetadata

    path = media.static_video(tmp_path / "clip.mp4", num_frames=40, size=96, fps=10.0)
    count = qwen_frame_count(40, 10.0)
    video = read_video_frames(path, num_frames=count)
    assert video.num_frames == count == 8
    metadata = VideoMetadata(total_num_frames=40, fps=10.0, frames_indices=video.indices)
    for family, processor in processors.items():
        inputs = video_inputs(processor, video.frames, video.timestamps, total_frames=40, video_fps=10.0)
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what?"}]}]
        stock = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                          videos=[video.frames], videos_kwargs={"video_metadata": [metadata], "do_sample_frames": False},
                          return_tensors="pt")
        assert torch.equal(inputs.grid_thw, stock["video_grid_thw"]) and int(inputs.grid_thw[0, 0]) == 4
        torch.testing.assert_close(inputs.pixel_values, stock["pixel_values_videos"])
        if family == "qwen2.5-vl":
            assert inputs.seconds_per_slot[0] == pytest.approx(float(stock["second_per_grid_ts"][0]))
        else:  # the text timestamps the processor writes between the slots
            text = processor.decode(stock["input_ids"][0])
            assert [f"<{t:.1f}seconds>" in text.replace(" ", "") for t in inputs.slot_timestamps[0]] == [True] * 4
            expected = processor._calculate_timestamps(video.indices, 10.0, 2)
            assert inputs.slot_timestamps[0] == pytest.approx(expected)
    assert slot_times([0.0, 1.0, 2.0]) == [0.5, 2.0]


def test_images_keep_the_processors_dynamic_resolution(processors):
    image = Image.fromarray(media.textured_frame(200)).resize((330, 200))
    for processor in processors.values():
        inputs = image_inputs(processor, [image, np.asarray(image)])
        stock = processor.image_processor(images=[image], return_tensors="pt")
        assert torch.equal(inputs.grid_thw[0], stock["image_grid_thw"][0]) and len(inputs) == 2
        assert inputs.seconds_per_slot == [0.0, 0.0] and inputs.slot_timestamps == [[], []]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen-calibration")
    rng = np.random.default_rng(0)
    Image.new("RGB", (400, 300), (90, 120, 200)).save(folder / "flat.png")
    Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.fromarray(media.textured_frame(384, seed=1)).save(folder / "textured.jpg")
    media.static_video(folder / "clip.mp4", num_frames=6, size=128)
    return folder


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_calibrate_then_tokens(family, tiny_qwen25, tiny_qwen3, data, tmp_path, capsys):
    model = str(tiny_qwen25 if family == "qwen2.5-vl" else tiny_qwen3)
    out = tmp_path / "mid.json"
    assert main(["calibrate", "--model", model, "--data", str(data), "--preset", "mid", "--out", str(out),
                 "--batch-size", "3", "--frames-per-video", "2", "--device", "cpu"]) == 0
    thresholds = Thresholds.load(out)
    cells = (448 // (28 if family == "qwen2.5-vl" else 32)) ** 2
    assert thresholds.encoder.family == family and len(thresholds.taus) == 4
    assert thresholds.target_keep == round(195 / 576 * cells)
    assert 0.5 * thresholds.target_keep < thresholds.achieved_mean < 1.5 * thresholds.target_keep
    capsys.readouterr()

    assert main(["tokens", "--model", model, "--thresholds", str(out), "--json", "--frames-per-video", "2",
                 "--device", "cpu", str(data / "flat.png"), str(data / "noise.png"), str(data / "clip.mp4")]) == 0
    report = json.loads(capsys.readouterr().out)
    flat, noise, *frames = report["items"]
    cell = 28 if family == "qwen2.5-vl" else 32
    assert flat["before"] == round(300 / cell) * round(400 / cell)  # the processor's dynamic resolution
    assert noise["before"] == round(320 / cell) ** 2
    assert flat["after"] * 4 < flat["before"] and flat["after"] < noise["after"] <= noise["before"]
    assert len(frames) == 2


def test_thresholds_of_one_qwen_family_are_refused_by_the_other(tiny_qwen25, tiny_qwen3, data, tmp_path):
    out = tmp_path / "q25.json"
    assert main(["calibrate", "--model", str(tiny_qwen25), "--data", str(data / "flat.png"),
                 str(data / "noise.png"), "--keep", "100", "--out", str(out), "--device", "cpu"]) == 0
    encoder = load_vision_model(str(tiny_qwen3), device="cpu", dtype="float32").encoder()
    with pytest.raises(ThresholdsError, match="do not fit"):
        Thresholds.load(out, encoder.fingerprint(), str(tiny_qwen3))


def test_a_job_can_calibrate_on_its_own_frames_and_find_them_again(tiny_qwen3, processors):
    from dymu.thresholds_store import calibrate_and_cache, find_thresholds

    vision = load_vision_model(str(tiny_qwen3), device="cpu", dtype="float32")
    frames = [media.textured_frame(128, seed=i) for i in range(3)] + [np.full((128, 160, 3), 90, np.uint8)]
    inputs = vision.calibration_pixels(frames)
    part = inputs[1:3]
    assert len(part) == 2 and torch.equal(part.grid_thw, inputs.grid_thw[1:3])
    per_image = int(inputs.grid_thw[0].prod())
    torch.testing.assert_close(part.pixel_values, inputs.pixel_values[per_image:3 * per_image])
    encoder = vision.encoder()
    # Presets are shares of the merge positions: 448 px / 32 px = 14x14 merger cells, or 28x28 patches.
    from dymu.vision.qwen_model import QwenFrameEncoder

    assert encoder.num_positions == 196 and QwenFrameEncoder(vision.visual, grouping="patch").num_positions == 784
    assert find_thresholds(str(tiny_qwen3), encoder, keep=60) is None
    made = calibrate_and_cache(str(tiny_qwen3), encoder, 60, inputs, "frames", batch_size=2)
    assert len(made.taus) == encoder.num_layers
    assert find_thresholds(str(tiny_qwen3), encoder, keep=60).taus == made.taus


def test_a_video_file_is_sampled_by_fps_and_paired_into_slots(processors, tmp_path):
    from dymu.vision.qwen_inputs import read_video_inputs

    path = media.static_video(tmp_path / "clip.mp4", num_frames=50, size=96, fps=10.0)  # 5 s
    inputs = read_video_inputs(processors["qwen2.5-vl"], path)
    assert len(inputs) == 1 and int(inputs.grid_thw[0, 0]) == 5  # 2 fps x 5 s = 10 frames = 5 slots
    assert inputs.seconds_per_slot == [pytest.approx(1.0)]
    assert inputs.slot_timestamps[0][0] == pytest.approx(0.25, abs=0.06)
    few = read_video_inputs(processors["qwen3-vl"], path, fps=0.2)  # 1 frame wanted: min_frames gives 4
    assert int(few.grid_thw[0, 0]) == 2
