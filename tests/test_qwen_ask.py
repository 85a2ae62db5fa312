"""Qwen2.5-VL and Qwen3-VL end to end: `--preset off` answers token for token as transformers' own pipeline
(processor, chat template, generate) for an image and a video; DToMe-merged tokens (DeepStack included) flow
through VideoQA and the `ask` / `caption` commands; bad input is one clear line and exit code 2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dymu.videoqa import VideoQA
from media import changing_video, static_video, textured_image
from pipeline.cli import main

FAMILIES = ["tiny_qwen25", "tiny_qwen3"]
QUESTION = "What is happening here?"


@pytest.fixture(autouse=True)
def _shared_runtime(ray_local, redis_server, monkeypatch):
    """`ask` runs through the Ray pipeline: share the session's Ray and Redis instead of starting new ones."""
    monkeypatch.setenv("REDIS_URL", redis_server.url)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-media")
    return {
        "video": changing_video(root / "changing.mp4", num_frames=8, size=64),
        "static": static_video(root / "static.mp4", num_frames=8, size=64),
        "image": textured_image(root / "photo.png", size=96),
        "one": changing_video(root / "one.mp4", num_frames=1, size=64),
    }


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def qa_off(checkpoint):
    return VideoQA.from_pretrained(str(checkpoint), preset="off", num_frames=4, max_new_tokens=12, device="cpu")


def transformers_answer(qa: VideoQA, path, kind: str, max_new_tokens: int, fill_slot: bool = False
                        ) -> tuple[list[int], dict]:
    """What transformers' own pipeline answers: the processor's chat template and inputs, then generate.
    Video frames are the ones dymu sampled, given with their metadata (the processor then samples none);
    ``fill_slot``: a lone frame given twice, the one way Qwen3-VL's processor takes it."""
    from transformers.video_utils import VideoMetadata

    processor, model = qa.family.processor, qa.family.model
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    media = qa.read(path)
    if kind == "image":
        inputs = processor(text=[text], images=[media.image.convert("RGB")], return_tensors="pt")
    else:
        frames = np.concatenate([media.frames, media.frames[-1:]]) if fill_slot else media.frames
        inputs = processor(text=[text], videos=[frames], video_metadata=[VideoMetadata(**media.video_metadata)],
                           do_sample_frames=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), inputs


@pytest.mark.parametrize("kind", ["image", "video"])
def test_preset_off_is_token_for_token_transformers_pipeline(qa_off, media, kind):
    answer = qa_off.ask(media[kind], QUESTION)
    expected, inputs = transformers_answer(qa_off, media[kind], kind, 12)
    assert answer.tokens == expected
    # The prompt and its M-RoPE positions are the stock model's (greedy tokens alone may not notice a shift).
    sequence = qa_off.family.question_sequence(qa_off.encode(qa_off.read(media[kind])), QUESTION, kind)
    ids = inputs["input_ids"]
    assert sequence.num_positions == ids.shape[1]
    positions, _ = qa_off.family.model.model.get_rope_index(ids, **{k: v for k, v in inputs.items() if k in (
        "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")})
    assert torch.equal(sequence.positions, positions[:, 0])
    llm = answer.report["llm"]
    assert llm["rows_fed"] == llm["virtual_length"]  # nothing merged
    if kind == "video":
        assert answer.report["frames"] == 4 and answer.report["slots"] == 2  # two frames per temporal slot
        assert len(answer.report["tokens"]["dtome_per_frame"]) == 2  # the token counts are per slot


@pytest.mark.parametrize("clip, frames", [("one", 4), ("video", 1)])
def test_a_single_frame_is_one_slot_of_that_frame_repeated(checkpoint, media, clip, frames):
    """A one-frame video, or `--frames 1`: the frame fills a temporal slot (Qwen3-VL's processor refuses fewer
    frames than a slot), and `off` answers as transformers' pipeline given that frame twice."""
    qa = VideoQA.from_pretrained(str(checkpoint), preset="off", num_frames=frames, max_new_tokens=8, device="cpu")
    assert qa.read(media[clip]).frames.shape[0] == 1
    answer = qa.ask(media[clip], QUESTION)
    assert answer.report["frames"] == 1 and answer.report["slots"] == 1
    assert len(answer.report["timestamps"]) == 1
    expected, inputs = transformers_answer(qa, media[clip], "video", 8, fill_slot=True)
    assert answer.tokens == expected and int(inputs["video_grid_thw"][0, 0]) == 1


@pytest.fixture(scope="module")
def qa_merged(checkpoint, media):
    """Preset mid; thresholds calibrated on the changing clip's own frames (no file: the job calibrates)."""
    qa = VideoQA.from_pretrained(str(checkpoint), preset="mid", num_frames=8, max_new_tokens=6, device="cpu",
                                 temporal_threshold=0.8)
    qa.visual_tokenizer(qa.read(media["video"]))
    return qa


def test_merged_tokens_flow_through_vtu(qa_merged, qa_off, media):
    merged = qa_merged.encode(qa_merged.read(media["static"]))
    full = qa_off.encode(qa_off.read(media["static"]))
    assert merged.num_unique < 0.5 * merged.num_positions
    assert len(merged.deepstack) == len(full.deepstack)  # Qwen3-VL: DeepStack rows follow the merged rows
    assert all(d.shape[0] == merged.num_unique for d in merged.deepstack)
    stages = merged.meta["stages"]
    assert sum(stages["temporal_rows_per_frame"]) < sum(stages["layout_rows_per_frame"])  # a static scene
    assert stages["encoded_frames"] == 1 < merged.num_frames  # later slots reuse the first one's encoding
    changing = qa_merged.encode(qa_merged.read(media["video"]))
    assert changing.meta["stages"]["encoded_frames"] == changing.num_frames
    answer = qa_merged.answer(merged, QUESTION)
    llm = answer.report["llm"]
    assert llm["rows_fed"] < llm["virtual_length"]
    # Every original position is there: the prompt is as long as the unmerged one (8 frames = 4 slots).
    assert merged.num_positions == 2 * full.num_positions
    assert answer.tokens


def test_no_vtu_baseline_and_pruning_run(qa_merged, media):
    tokens = qa_merged.encode(qa_merged.read(media["static"]))
    config = qa_merged.config
    for overrides in ({"vtu": False}, {"prune": {"enabled": True, "layer": 0, "start_step": 1, "interval": 1}}):
        qa = VideoQA(qa_merged.family, type(config)(**{**config.to_dict(), **overrides}))
        answer = qa.answer(tokens, QUESTION)
        assert len(answer.tokens) >= 1


def test_ask_and_caption_commands(tiny_qwen25, tiny_qwen3, media, tmp_path, capsys):
    """Through the Ray pipeline (Redis cache included): `ask` on a Qwen3-VL video, `caption` on a Qwen2.5-VL
    video and image. One family each: every run starts the pipeline's actors, which costs tens of seconds."""
    rc = main(["ask", str(media["video"]), QUESTION, "--model", str(tiny_qwen3), "--preset", "off", "--frames", "4",
               "--max-new-tokens", "4", "--json", "--device", "cpu"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "video" and report["llm"]["answer_tokens"] >= 1
    assert report["frames"] == 4 and report["slots"] == 2  # frames, not temporal slots

    out = tmp_path / "captions.jsonl"
    rc = main(["caption", str(media["video"]), str(media["image"]), "--model", str(tiny_qwen25), "--preset", "off",
               "--frames", "4", "--max-new-tokens", "3", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["kind"] for line in lines) == ["image", "video"]
    assert all("caption" in line for line in lines)


def test_caption_takes_one_frame_on_qwen3(tiny_qwen3, media, tmp_path, capsys):
    """`caption` (the Ray pipeline `ask` and `serve` run too) on a one-frame video and a longer one with
    `--frames 1`: Qwen3-VL recorded `t:1 must be larger than temporal_factor:2` for both."""
    out = tmp_path / "captions.jsonl"
    rc = main(["caption", str(media["one"]), str(media["video"]), "--model", str(tiny_qwen3), "--frames", "1",
               "--max-new-tokens", "3", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 and all(line.get("caption") and line["frames"] == 1 for line in lines), lines


@pytest.mark.parametrize("path, args, message", [
    ("missing.mp4", [], "no such file"),
    ("video", ["--frames", "0"], "num_frames"),
])
def test_bad_input_is_one_clear_line_and_exit_2(checkpoint, media, tmp_path, capsys, path, args, message):
    path = media.get(path, tmp_path / path)
    rc = main(["ask", str(path), QUESTION, "--model", str(checkpoint), "--device", "cpu", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err


def test_the_engine_answers_qwen_as_the_single_loop_does(qa_merged, media):
    """M-RoPE positions and DeepStack through the batched engine: a batch of merged prompts, one of them
    pruning, and a second question on a video answered from the visual-prefix cache, all equal to `generate`."""
    import dataclasses

    from dymu.llm import PruneConfig, generate

    static = qa_merged.encode(qa_merged.read(media["static"]))
    changing = qa_merged.encode(qa_merged.read(media["video"]))
    prune = PruneConfig(enabled=True, layer=0, start_step=1, interval=1)
    cases = [(static, QUESTION, None), (changing, QUESTION, prune), (static, "And the colours?", None)]
    requests = []
    for tokens, question, pruning in cases:
        sequence, config, key, prefix = qa_merged.answer_request(tokens, question)
        config = dataclasses.replace(config, keep_logits=True, prune=pruning or config.prune)
        requests.append((sequence, config, key, prefix))
    assert requests[0][2] == requests[2][2]  # same video, same text before it: the same visual prefix

    engine = qa_merged.make_engine()
    first = engine.add_request(*requests[0])
    second = engine.add_request(*requests[1])
    results = engine.run()
    third = engine.add_request(*requests[2])  # after the first has finished: its prefix is cached
    results.update(engine.run())
    assert engine.stats()["prefix_hits"] == 1
    for request_id, (sequence, config, _, _) in zip((first, second, third), requests):
        alone = generate(qa_merged.family.model, sequence, config, tokenizer=qa_merged.family.tokenizer)
        batched = results[request_id]
        assert batched.tokens == alone.tokens
        assert batched.kept_trace == alone.kept_trace
        for a, b in zip(batched.logits, alone.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_preempted_qwen_answer_is_recomputed_at_its_own_mrope_positions(qa_merged, media):
    """A KV pool with room for both prompts but not both answers: the later one is preempted mid-answer and
    recomputed (prompt + its answer so far), its answer's text at the positions after the prompt's largest
    M-RoPE index; every answer and its logits equal the single loop's."""
    import dataclasses

    from dymu.engine import Engine, EngineConfig
    from dymu.engine.block_manager import block_bytes
    from dymu.llm import PruneConfig, generate
    from dymu.llm.decoder import load_decoder

    requests = []
    for path in (media["static"], media["video"]):
        sequence, config, _, _ = qa_merged.answer_request(qa_merged.encode(qa_merged.read(path)), QUESTION)
        config = dataclasses.replace(config, max_new_tokens=10, keep_logits=True, prune=PruneConfig())
        requests.append((sequence, config))
    # Merged rows: the row count is not the next M-RoPE position, so a recompute that confused them would show.
    assert all(sequence.num_rows != sequence.next_position for sequence, _ in requests)

    decoder = load_decoder(qa_merged.family.model)
    block_size = 4
    admit = sum(decoder.num_layers * (-(-sequence.num_positions // block_size) + 1) for sequence, _ in requests)
    blocks = admit + decoder.num_layers  # both prompts fit, then the decodes outgrow the pool
    gb = blocks * block_bytes(block_size, decoder.num_kv_heads, decoder.head_dim, decoder.dtype) / 2**30
    engine = Engine(decoder, qa_merged.family.tokenizer, EngineConfig(kv_cache_gb=gb, block_size=block_size,
                                                                      max_batch=2))
    recomputed = []  # answer tokens already there when a preempted request was admitted again
    start = engine.scheduler._start
    engine.scheduler._start = lambda request: (request.preemptions and recomputed.append(len(request.tokens)),
                                               start(request))
    ids = [engine.add_request(sequence, config) for sequence, config in requests]
    results = engine.run()
    assert engine.stats()["preemptions"] >= 1 and recomputed and min(recomputed) >= 2
    for request_id, (sequence, config) in zip(ids, requests):
        alone = generate(qa_merged.family.model, sequence, config, tokenizer=qa_merged.family.tokenizer)
        assert results[request_id].tokens == alone.tokens
        # Tight: the tiny Qwen2.5-VL's attention is nearly flat, so text rotated at wrong positions moves its
        # logits by only ~6e-5 (greedy tokens stay the same); batched and single agree to ~1e-7.
        for batched, single in zip(results[request_id].logits, alone.logits):
            torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_a_visual_prefix_key_changes_with_the_prefix_positions(qa_merged, media):
    """The same merged rows and words at other M-RoPE positions (Qwen2.5-VL: another seconds per slot, as a
    clip of the same frames over a longer time has) are other KV entries: another prefix key."""
    import dataclasses

    if qa_merged.family.name != "qwen2.5-vl":
        pytest.skip("Qwen3-VL tells time in timestamp words before each slot: text the key holds already")
    tokens = qa_merged.encode(qa_merged.read(media["static"]))
    slower = dataclasses.replace(tokens, meta={**tokens.meta, "seconds_per_slot": 7.0})
    (sequence, _, key, prefix), (other, _, other_key, other_prefix) = (
        qa_merged.answer_request(t, QUESTION) for t in (tokens, slower))
    assert prefix == other_prefix and torch.equal(sequence.rows, other.rows)
    assert not torch.equal(sequence.positions[:, :prefix], other.positions[:, :prefix])
    assert key != other_key
    assert qa_merged.answer_request(dataclasses.replace(tokens), QUESTION)[2] == key
