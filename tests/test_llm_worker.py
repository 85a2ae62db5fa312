"""The LLM worker as a Ray actor around the batched engine: concurrent questions are answered together and
each equals the in-process answer; a second question about a video reuses its visual prefix; per-request
options; cancelling a stream frees its memory."""
from __future__ import annotations

import time

import pytest
import ray

from dymu.config import make_config
from dymu.errors import DymuError
from dymu.videoqa import Answer
from media import changing_video
from workers.llm_worker import LLMWorker
from workers.vision_encoder import load_videoqa

QUESTIONS = ["What happens?", "Describe the scene in detail.", "Is anything moving?", "What colour is it?"]


@pytest.fixture(scope="module")
def setup(ray_local, tiny_ov, tmp_path_factory):
    root = tmp_path_factory.mktemp("worker-videos")
    config = make_config("mid", None, model=str(tiny_ov), num_frames=4, max_new_tokens=24, max_batch=4,
                         kv_cache_gb=0.05, prefix_cache_gb=0.01)
    qa = load_videoqa(config, None)
    videos = [changing_video(root / f"w{i}.mp4", num_frames=4, size=64, seed=i) for i in range(2)]
    tokens = [qa.encode(qa.read(video)) for video in videos]
    worker = ray.remote(LLMWorker).options(num_cpus=0.5).remote(config, 1)
    yield qa, tokens, worker
    ray.kill(worker)


def collect(stream) -> tuple[list[str], Answer]:
    pieces = []
    for ref in stream:
        item = ray.get(ref)
        if isinstance(item, Answer):
            return pieces, item
        pieces.append(item)
    raise AssertionError("the stream ended without an answer")


def test_concurrent_questions_equal_the_in_process_answers_and_reuse_the_prefix(setup):
    qa, tokens, worker = setup
    asked = [(tokens[i % 2], question) for i, question in enumerate(QUESTIONS)]
    streams = [worker.stream.remote(t, q, f"video{i % 2}") for i, (t, q) in enumerate(asked)]
    answers = [collect(stream) for stream in streams]
    for (t, question), (pieces, answer) in zip(asked, answers):
        expected = qa.answer(t, question)
        assert answer.tokens == expected.tokens and answer.text == expected.text
        assert "".join(pieces).strip() == answer.text
        assert answer.report["seconds"]["prefill"] > 0
    stats = ray.get(worker.stats.remote())
    assert stats["most_running"] >= 2 and stats["running"] == 0 and stats["waiting"] == 0
    # Both videos' prefixes are cached by now: another question about one of them prefills only its words.
    again = ray.get(worker.answer.remote(tokens[0], "And then?"))
    assert again.report["llm"]["prefix_cache"] == "hit"
    assert again.tokens == qa.answer(tokens[0], "And then?").tokens


def test_options_override_the_config_per_request(setup):
    qa, tokens, worker = setup
    answer = ray.get(worker.answer.remote(tokens[1], "What happens?", "", {"max_new_tokens": 3}))
    assert len(answer.tokens) == 3 and answer.report["llm"]["stop_reason"] == "max_new_tokens"
    with pytest.raises(DymuError, match="unknown generation option"):
        qa.generate_config({"max_tokens": 3})


def test_cancelling_a_stream_aborts_it_and_frees_its_memory(setup):
    _, tokens, worker = setup
    idle = ray.get(worker.stats.remote())
    stream = worker.stream.remote(tokens[0], "Tell me everything.", "", {"max_new_tokens": 100000})
    next(stream)  # it is running
    ray.cancel(stream)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = ray.get(worker.stats.remote())
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        time.sleep(0.1)
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["aborted"] == idle["aborted"] + 1
    assert stats["kv_blocks_free"] == idle["kv_blocks_free"]
