"""The tiny checkpoints are real checkpoints: transformers loads them and runs the stock forward."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dymu.tiny import make_tiny_checkpoint
from pipeline.cli import main


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))


def test_llava_loads_and_generates_through_its_own_processor(tiny_llava):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_llava)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava).eval()
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=_image(), text=prompt, return_tensors="pt")
    # 336/14 = 24 -> 576 patch tokens stand in for the one <image> placeholder (CLS is dropped).
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 576
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_onevision_loads_and_runs_stock_forward(tiny_ov):
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny_ov)
    image_processor = AutoImageProcessor.from_pretrained(tiny_ov)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_ov).eval()
    vision = model.config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 == 729
    pixels = image_processor(_image(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.vision_tower(pixels[:, 0], output_hidden_states=True).hidden_states[-1]
    assert feats.shape == (1, 729, vision.hidden_size)
    ids = tokenizer("Describe the scene.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="LLaVA-OneVision's processor needs torchvision")
def test_onevision_auto_processor_loads(tiny_ov):
    from transformers import AutoProcessor

    assert type(AutoProcessor.from_pretrained(tiny_ov)).__name__ == "LlavaOnevisionProcessor"


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = load_file(make_tiny_checkpoint(tmp_path / "a", "llava", seed=3) / "model.safetensors")
    b = load_file(make_tiny_checkpoint(tmp_path / "b", "llava", seed=3) / "model.safetensors")
    c = load_file(make_tiny_checkpoint(tmp_path / "c", "llava", seed=4) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cli_writes_a_checkpoint(tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "m"), "--family", "llava"]) == 0
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert "wrote a tiny llava checkpoint" in capsys.readouterr().out


def test_cli_refuses_a_file_or_a_folder_with_something_in_it_unless_overwrite(tmp_path, capsys):
    (tmp_path / "a-file").write_bytes(b"a file")
    assert main(["make-tiny-model", str(tmp_path / "a-file")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"dymu-video make-tiny-model: error: {tmp_path}/a-file is a file, not a folder"
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_bytes(b'{"model_type": "a real one"}')  # a real checkpoint named by mistake
    assert main(["make-tiny-model", str(checkpoint), "--family", "llava"]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in checkpoint.iterdir()] == ["config.json"]
    assert (checkpoint / "config.json").read_bytes() == b'{"model_type": "a real one"}'
    assert (tmp_path / "a-file").read_bytes() == b"a file"
    assert main(["make-tiny-model", str(checkpoint), "--family", "llava", "--overwrite"]) == 0
    assert (checkpoint / "model.safetensors").exists() and b'"llava"' in (checkpoint / "config.json").read_bytes()
    (tmp_path / "empty").mkdir()
    assert main(["make-tiny-model", str(tmp_path / "empty"), "--family", "llava"]) == 0  # empty: nothing to lose


def test_cli_rejects_unknown_family(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["make-tiny-model", str(tmp_path / "m"), "--family", "gpt2"])
    assert exc.value.code == 2


def _qwen_model_cls(family: str):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration if family == "qwen2.5-vl" else Qwen3VLForConditionalGeneration


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_qwen_loads_and_generates_image_and_video_through_its_own_processor(family, tiny_qwen25, tiny_qwen3):
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    path = tiny_qwen25 if family == "qwen2.5-vl" else tiny_qwen3
    processor = AutoProcessor.from_pretrained(path)
    model = _qwen_model_cls(family).from_pretrained(path).eval()
    vision = model.config.vision_config
    patch = 14 if family == "qwen2.5-vl" else 16
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (patch, 2, 2)
    if family == "qwen2.5-vl":
        assert vision.window_size == 112 and list(vision.fullatt_block_indexes) == [vision.depth - 1]
    else:
        assert len(vision.deepstack_visual_indexes) >= 1 and model.config.text_config.head_dim == 32

    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    inputs = processor(images=_image(), text=processor.apply_chat_template(image, add_generation_prompt=True),
                       return_tensors="pt")
    # Dynamic resolution: 240x320 rounded to the patch x merge grid (28 or 32 px).
    t, h, w = inputs["image_grid_thw"][0].tolist()
    factor = 2 * patch
    assert (t, h * patch, w * patch) == (1, round(240 / factor) * factor, round(320 / factor) * factor)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == h * w // 4
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3

    frames = np.random.default_rng(1).integers(0, 255, (8, 240, 320, 3), dtype=np.uint8)
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    inputs = processor(
        videos=[frames], text=processor.apply_chat_template(video, add_generation_prompt=True), return_tensors="pt",
        videos_kwargs={"video_metadata": [VideoMetadata(total_num_frames=8, fps=4.0, frames_indices=list(range(8)))],
                       "do_sample_frames": False},
    )
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert t == 4  # two frames per temporal slot
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == t * h * w // 4
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_cli_writes_a_qwen_checkpoint(family, tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "m"), "--family", family]) == 0
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "processor_config.json").exists()
    assert f"wrote a tiny {family} checkpoint" in capsys.readouterr().out
