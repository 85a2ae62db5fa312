"""`--preset off` answers token for token as transformers' own `generate`, for images too and for LLaVA-1.5,
with the stock side prepared by the checkpoint's own image processor (AutoImageProcessor), not by our code.

(The LLaVA-OneVision video processor and AutoProcessor need torchvision, which the test environment lacks;
the video case is covered in test_ask.py with our frame preprocessing on both sides.)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from dymu.answer import question_sequence
from dymu.llm import GenerateConfig, generate
from dymu.videoqa import VideoQA
from tests.media import textured_frame

QUESTION = "What is in the picture?"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A non-square photo, so that LLaVA-OneVision's AnyRes crops and unpadding matter."""
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    frame = textured_frame(200, seed=5)
    Image.fromarray(np.ascontiguousarray(frame[:120])).save(path)
    return path


def stock_generate(qa: VideoQA, checkpoint, photo, num_image_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' generate on the checkpoint's own image processing, and its first next-token logits; the
    prompt is the checkpoint's chat template with its image placeholder repeated once per image feature."""
    family = qa.family
    processor = AutoImageProcessor.from_pretrained(str(checkpoint))
    inputs = processor(Image.open(photo).convert("RGB"), return_tensors="pt")
    prompt = family.prompt(QUESTION, "image")
    image_tokens = [family.config.image_token_index] * num_image_tokens
    input_ids = torch.tensor([prompt.before + image_tokens + prompt.after])
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "pixel_values": inputs["pixel_values"]}
    if "image_sizes" in inputs:
        kwargs["image_sizes"] = inputs["image_sizes"]
    with torch.no_grad():
        out = family.model.generate(**kwargs, max_new_tokens=NEW_TOKENS, do_sample=False)
        logits = family.model(**kwargs).logits[0, -1]
    return out[0, input_ids.shape[1]:].tolist(), logits


@pytest.mark.parametrize("checkpoint_fixture", ["tiny_ov", "tiny_llava"])
def test_preset_off_image_answer_is_transformers_generate(checkpoint_fixture, photo, request):
    checkpoint = request.getfixturevalue(checkpoint_fixture)
    qa = VideoQA.from_pretrained(str(checkpoint), preset="off", max_new_tokens=NEW_TOKENS, device="cpu",
                                 dtype="float32")
    answer = qa.ask(photo, QUESTION)
    positions = answer.report["tokens"]["llm_visual_positions"]
    # transformers refuses a count of image tokens that differs from its own features, so this checks ours too.
    expected, stock_logits = stock_generate(qa, checkpoint, photo, positions)
    assert answer.tokens == expected
    # Random tiny models soon repeat one token, so compare the first next-token distribution as well.
    sequence = question_sequence(qa.family, qa.encode(qa.read(photo)), QUESTION, "image")
    ours = generate(qa.family.model, sequence, GenerateConfig(max_new_tokens=1, keep_logits=True)).logits[0]
    torch.testing.assert_close(ours.float(), stock_logits.float(), atol=1e-4, rtol=1e-4)
    tokens = answer.report["tokens"]
    assert all(n == tokens["encoder_per_frame"] for n in tokens["dtome_per_frame"])  # nothing merged
    if checkpoint_fixture == "tiny_llava":
        assert positions == 576
    else:
        assert positions > 729  # base image + crops, unpadded, with newlines
