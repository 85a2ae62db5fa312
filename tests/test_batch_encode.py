"""Batched vision encoding: several media through the encoder together, each getting exactly the tokens it
gets alone; a bad medium fails alone; the encoder actor batches the calls queued while it works."""
from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from media import textured_frame
from dymu.batch_encode import take_batch
from dymu.config import make_config
from dymu.tokens import MergedTokens
from dymu.videoqa import Media, VideoQA
from pipeline.jobs import encoder_capacity


def video(num_frames: int, seed: int, size: int = 64) -> Media:
    frames = np.stack([textured_frame(size, seed + 7 * i) for i in range(num_frames)])
    return Media(f"video-{seed}", "video", frames=frames, timestamps=[0.5 * i for i in range(num_frames)])


def image(seed: int, size: int = 80) -> Media:
    return Media(f"image-{seed}", "image", image=Image.fromarray(textured_frame(size, seed)))


def broken() -> Media:
    """A video with no frames (what a decoder bug would hand over)."""
    return Media("broken", "video", frames=np.zeros((0, 64, 64, 3), dtype=np.uint8), timestamps=[])


def assert_same_tokens(got: MergedTokens, alone: MergedTokens) -> None:
    assert torch.equal(got.mapping, alone.mapping) and torch.equal(got.sizes, alone.sizes)
    torch.testing.assert_close(got.embeds, alone.embeds, rtol=1e-5, atol=1e-5)
    assert len(got.deepstack) == len(alone.deepstack)
    for a, b in zip(got.deepstack, alone.deepstack):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got.positions_per_frame == alone.positions_per_frame and got.timestamps == alone.timestamps
    assert got.meta["stages"] == alone.meta["stages"] and got.meta["kind"] == alone.meta["kind"]
    assert got.config_hash == alone.config_hash


def test_a_batch_takes_queued_media_up_to_the_frame_budget():
    assert take_batch([8, 8, 8], 16) == 2
    assert take_batch([4, 4, 4, 4], 10) == 2
    assert take_batch([32, 8], 16) == 1  # a longer video goes alone
    assert take_batch([8, 32, 1], 16) == 1  # in order: nothing jumps the queue
    assert take_batch([1], 1) == 1


def test_an_encoder_is_lent_to_two_batches_of_jobs():
    assert encoder_capacity(make_config("mid", num_frames=8, encode_batch_frames=32)) == 8
    assert encoder_capacity(make_config("mid", num_frames=8, encode_batch_frames=4)) == 2  # one video per batch
    assert encoder_capacity(make_config("mid", fps=1.0, max_frames=16, encode_batch_frames=32)) == 4


def loaded(path, preset: str) -> VideoQA:
    """Chunks of 4 frames, so that they cut across videos of different lengths and sizes. Thresholds are
    calibrated on a video of its own: the calibration frames have edges exactly at their thresholds, where
    rounding alone decides a merge, as the batch neighbours of a frame change it."""
    qa = VideoQA.from_pretrained(str(path), preset=preset, device="cpu", encode_batch_frames=4)
    qa.encode(video(2, 99))
    return qa


@pytest.fixture(scope="module")
def qa_mid(tiny_ov):
    return loaded(tiny_ov, "mid")


@pytest.mark.parametrize("family,preset", [("tiny_ov", "mid"), ("tiny_ov", "off"), ("tiny_qwen25", "mid")])
def test_media_encoded_together_get_the_tokens_they_get_alone(family, preset, request):
    if (family, preset) == ("tiny_ov", "mid"):
        qa = request.getfixturevalue("qa_mid")
    else:
        qa = loaded(request.getfixturevalue(family), preset)
    media = [video(3, 1), video(2, 2, size=96), image(3), video(4, 4), video(1, 5)]
    alone = [qa.encode(m) for m in media]
    together = qa.encode_many(media)
    for got, expected in zip(together, alone):
        assert_same_tokens(got, expected)
    if preset == "mid":  # merged: the frames of the batch really had different token counts
        assert len({n for t in alone for n in t.meta["stages"]["dtome_tokens_per_frame"]}) > 1


def test_a_bad_medium_fails_alone(qa_mid, monkeypatch):
    qa = qa_mid
    good = [video(2, 11), video(1, 12)]
    alone = [qa.encode(m) for m in good]
    # Preparing it fails (no frames): only its own result is the error.
    results = qa.encode_many([good[0], broken(), good[1]])
    assert isinstance(results[1], Exception)
    assert_same_tokens(results[0], alone[0]) and assert_same_tokens(results[2], alone[1])

    # The shared encoder call fails because of one medium (here: the one with 3 frames): the batch is retried
    # one medium at a time, so the others still get their tokens.
    visual = qa.visual_tokenizer()
    encode_pending = visual.encode_pending

    def failing_with_three_frames(pending):
        if any(p.num_inputs == 3 for p in pending):
            raise RuntimeError("the encoder choked")
        return encode_pending(pending)

    monkeypatch.setattr(visual, "encode_pending", failing_with_three_frames)
    results = qa.encode_many([good[0], video(3, 13), good[1]])
    assert isinstance(results[1], RuntimeError)
    assert_same_tokens(results[0], alone[0]) and assert_same_tokens(results[2], alone[1])


def test_the_encoder_actor_batches_queued_calls_and_fails_only_the_bad_one(ray_local, tiny_ov, qa_mid):
    from workers.vision_encoder import VisionEncoder

    config = make_config("mid", None, model=str(tiny_ov), device="cpu", encode_batch_frames=64)
    qa = qa_mid
    media = [video(2, 21), video(1, 22, size=96), broken(), video(2, 23), video(1, 24)]
    encoder = ray.remote(VisionEncoder).options(num_cpus=0).remote(config, 1)
    ray.get(encoder.cache_settings.remote(media[0]))  # loaded, thresholds settled
    calls = [encoder.encode.remote(m) for m in media]
    for i, (summary, tokens) in enumerate(calls):
        if i == 2:
            with pytest.raises(ray.exceptions.RayTaskError):
                ray.get(summary)
            continue
        got = ray.get(tokens)
        assert_same_tokens(got, qa.encode(media[i]))
        assert ray.get(summary)["rows"] == got.num_unique
    stats = ray.get(encoder.stats.remote())
    assert sum(stats["media_per_batch"]) == len(media)
    assert max(stats["media_per_batch"]) > 1  # calls queued while one batch ran were encoded together
    ray.kill(encoder)
