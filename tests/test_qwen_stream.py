"""Live feeds on Qwen2.5-VL and Qwen3-VL: a feed's memory holds temporal slots (two frames each) with their
DeepStack rows, and a window's answer is the one `ask` gives over the same frames (same tokens, prompt and
M-RoPE positions); the stream runner pairs frames across batches, and `dymu-video stream` follows a file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dymu.config import make_config
from dymu.videoqa import Media
from media import changing_video, textured_frame
from pipeline.ingest import FeedOptions
from pipeline.stream import FeedMemory, LiveStreams, connect_feeds
from pipeline.stream_engine import LocalEngine

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is there?"


@pytest.fixture(autouse=True)
def torch_threads():
    """``open_streams`` sizes torch's thread pool for its readers; the next tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["tiny_qwen25", "tiny_qwen3"])
def engine(request):
    checkpoint = request.getfixturevalue(request.param)
    return LocalEngine.from_config(make_config("mid", model=str(checkpoint), device="cpu", max_new_tokens=6))


def feed_frames(count: int, size: int = 96) -> list[np.ndarray]:
    """A camera view with sensor noise whose second half shows another scene: slots merge, but not all."""
    rng = np.random.default_rng(0)
    views = [textured_frame(size, seed=1).astype(np.float32), textured_frame(size, seed=2).astype(np.float32)]
    return [np.clip(views[2 * i >= count] + rng.normal(0, 15, views[0].shape), 0, 255).astype(np.uint8)
            for i in range(count)]


def test_a_window_answers_as_ask_over_the_same_frames(engine):
    frames, times = feed_frames(8), [100.0 + 0.5 * i for i in range(8)]
    slots = engine.encode_frames(frames[:3], times[:3]) + engine.encode_frames(frames[3:], times[3:])
    assert engine.frames_per_slot == 2
    # Batches of 3 and 5 frames: each makes whole pairs and a slot of its last frame alone.
    assert [slot.meta["frame_times"] for slot in slots] == [[100.0, 100.5], [101.0], [101.5, 102.0], [102.5, 103.0],
                                                           [103.5]]
    slots = engine.encode_frames(frames, times)  # as the stream runner hands them over: in pairs
    memory = FeedMemory(window_s=60, threshold=engine.config.temporal_threshold)
    memory.add(slots)
    window = memory.window(engine.newline())
    assert memory.state.num_frames == 4 and window.meta["frames"] == 8 and window.meta["slots"] == 4
    assert window.meta["video_metadata"]["frames_indices"] == [0, 500, 1000, 1500, 2000, 2500, 3000, 3500]

    qa = engine.qa
    media = Media("clip", "video", frames=np.stack(frames), timestamps=times,
                  video_metadata=window.meta["video_metadata"])
    asked = qa.encode(media)
    assert window.meta["grid_thw"] == asked.meta["grid_thw"]
    assert qa.family.video_seconds_per_slot(window) == asked.meta["seconds_per_slot"] == pytest.approx(1.0)
    assert max(s.num_unique for s in slots) < window.num_unique < sum(s.num_unique for s in slots)  # some merged
    assert torch.equal(window.mapping, asked.mapping)
    torch.testing.assert_close(window.embeds, asked.embeds)
    assert len(window.deepstack) == len(asked.deepstack) == (2 if qa.family.name == "qwen3-vl" else 0)
    for ours, theirs in zip(window.deepstack, asked.deepstack):
        torch.testing.assert_close(ours, theirs)
    ours, theirs = (qa.family.question_sequence(t, QUESTION, "video") for t in (window, asked))
    assert torch.equal(ours.positions, theirs.positions) and torch.equal(ours.rows, theirs.rows)

    answer, expected = engine.answer(window, QUESTION), qa.answer(asked, QUESTION)
    assert answer.tokens == expected.tokens and len(answer.tokens) == 6
    assert answer.report["frames"] == expected.report["frames"] == 8
    assert answer.report["slots"] == expected.report["slots"] == 4


def test_a_feed_ending_on_one_frame_makes_a_slot_of_it_repeated(engine):
    """A lone last frame (a feed that ends, or changes size, on an odd frame) is its own slot: the frame
    given twice, as the processor pairs it (Qwen3-VL's processor refuses a single frame)."""
    frames = feed_frames(2)
    alone, = engine.encode_frames(frames[:1], [7.0])
    pair, = engine.encode_frames([frames[0], frames[0]], [7.0, 7.0])
    assert alone.meta["frame_times"] == [7.0] and alone.timestamps == [7.0]
    torch.testing.assert_close(alone.embeds, pair.embeds)
    for ours, theirs in zip(alone.deepstack, pair.deepstack, strict=True):
        torch.testing.assert_close(ours, theirs)
    memory = FeedMemory(window_s=60, threshold=engine.config.temporal_threshold)
    memory.add(engine.encode_frames(frames, [6.0, 6.5]) + [alone])
    window = memory.window(engine.newline())
    assert window.meta["frames"] == 3 and window.meta["slots"] == 2
    assert engine.answer(window, QUESTION).tokens


def test_eviction_drops_whole_slots_with_their_deepstack_rows(engine):
    frames, times = feed_frames(10), [float(i) / 2 for i in range(10)]
    memory = FeedMemory(window_s=1.6, threshold=engine.config.temporal_threshold)
    memory.add(engine.encode_frames(frames, times))
    state = memory.state
    # Slots start at 0, 1, 2, 3 and 4 s; the newest frame is at 4.5 s: the slots from 3 s on stay.
    assert [frame.frame_times for frame in state.frames] == [(3.0, 3.5), (4.0, 4.5)]
    assert (state.start, state.end, state.sampled_frames) == (3.0, 4.5, 4)
    assert [d.shape[0] for d in state.deepstack] == [state.num_rows] * len(state.deepstack)
    window = memory.window(engine.newline())
    assert window.validate().meta["grid_thw"][0] == 2
    assert window.meta["video_metadata"]["frames_indices"] == [0, 500, 1000, 1500]
    assert engine.answer(window, QUESTION).text is not None


def test_the_runner_pairs_frames_across_batches_and_flushes_an_odd_last_one(tiny_qwen25, tmp_path):
    clip = changing_video(tmp_path / "clip.mp4", num_frames=7, size=64, fps=4)
    engine = LocalEngine.from_config(make_config("mid", model=str(tiny_qwen25), device="cpu", max_new_tokens=4))
    readers = connect_feeds([str(clip)], FeedOptions(sample_fps=4, queue_frames=3))
    with LiveStreams(readers, engine, QUESTION, every_s=1.0, window_s=60) as streams:
        results = list(streams)
        state = streams.feeds[0].memory.state
    assert results and all(result.answer for result in results)
    last = results[-1]
    assert last.frames == last.frames_received == 7  # every frame, the seventh in a slot of its own
    assert [len(frame.frame_times) for frame in state.frames] == [2, 2, 2, 1]
    assert last.positions == 4 * state.frames[0].positions and 0 < last.tokens <= last.positions
    assert all(a.end < b.end for a, b in zip(results, results[1:]))


def test_stream_command_follows_a_file_on_qwen3(tiny_qwen3, tmp_path):
    clip = changing_video(tmp_path / "clip.mp4", num_frames=6, size=64, fps=4)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "stream", str(clip), "--ask", QUESTION, "--every",
                          "1s", "--window", "60s", "--sample-fps", "4", "--json", "--model", str(tiny_qwen3),
                          "--device", "cpu", "--max-new-tokens", "4"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert results and all(result["answer"] for result in results)
    assert results[-1]["frames"] == 6 and results[-1]["positions"] % 3 == 0
