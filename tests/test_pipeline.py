"""The pipeline's Python API on the session's local Ray, a real Redis and a tiny checkpoint: the same answer
as in one process, cache hits that skip decode and encode with identical tokens, bad videos as results,
and a Redis that goes away mid-batch."""
from __future__ import annotations

import pytest
import ray
import torch

from media import changing_video, static_video, truncated_copy
from dymu.config import make_config
from pipeline.jobs import Job, Pipeline, _Stage, plan_resources
from dymu.videoqa import VideoQA
from workers.redis_server import EmbeddedRedis
from workers.token_cache import TokenCache, content_hash, token_cache_key

FRAMES = 4


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-videos")
    return [changing_video(root / f"clip{i}.mp4", num_frames=6, size=96, seed=10 * i) for i in range(6)] + [
        static_video(root / "still.mp4", num_frames=6, size=96)]


@pytest.fixture(scope="module")
def module_redis():
    """This module's own Redis: the last test stops it."""
    with EmbeddedRedis(maxmemory="64mb") as server:
        yield server


@pytest.fixture(scope="module")
def config(tiny_ov):
    return make_config("mid", None, model=str(tiny_ov), num_frames=FRAMES, max_new_tokens=6)


@pytest.fixture(scope="module")
def pipeline(ray_local, module_redis, config):
    with Pipeline(config, module_redis.url, decoders=1) as pipe:
        yield pipe


def test_resource_plan_fits_the_cluster():
    decoder, model = plan_resources({"CPU": 2}, {"CPU": 2}, decoders=1, model_workers=2)
    assert decoder == {"num_cpus": 0.66} and model == {"num_cpus": 0.66}  # 3 x 0.66 <= 2: nothing waits forever
    assert "num_gpus" not in model
    decoder, model = plan_resources({"CPU": 16, "GPU": 1}, {"CPU": 16, "GPU": 1}, decoders=4, model_workers=2)
    assert decoder == {"num_cpus": 1.0} and model == {"num_cpus": 1.0, "num_gpus": 0.5}  # one GPU, shared
    _, model = plan_resources({"CPU": 8, "GPU": 4}, {"CPU": 8, "GPU": 4}, 2, 2, model_worker_cpus=3)
    assert model == {"num_cpus": 3, "num_gpus": 1.0}


def test_an_llm_worker_is_lent_to_max_batch_jobs_at_once():
    import queue

    stage = _Stage(["llm-a", "llm-b"], capacity=3)
    assert stage._free.qsize() == 6
    held = [stage.borrow() for _ in range(6)]
    lent = sorted(h.__enter__() for h in held)
    assert lent == ["llm-a"] * 3 + ["llm-b"] * 3
    assert stage._free.empty()  # a seventh job waits for one of them
    held[0].__exit__(None, None, None)
    assert stage._free.get_nowait() in ("llm-a", "llm-b")
    with pytest.raises(queue.Empty):
        stage._free.get_nowait()


def test_answer_is_the_in_process_answer_and_streams(pipeline, config, videos):
    pieces: list[str] = []
    result = pipeline.ask(videos[0], "What is happening?", on_text=pieces.append)
    # Thresholds were settled by the pipeline (calibrated and saved to the cache folder); VideoQA finds them.
    qa = VideoQA.from_pretrained(preset="mid", model=config.model, num_frames=FRAMES, max_new_tokens=6)
    expected = qa.ask(videos[0], "What is happening?")
    assert result.answer.tokens == expected.tokens and result.answer.text == expected.text
    assert result.answer.report["tokens"] == expected.report["tokens"]
    assert pieces and "".join(pieces).strip() == result.answer.text
    assert result.cache["status"] == "miss"


def test_second_question_is_a_cache_hit_with_identical_tokens(pipeline, module_redis, videos):
    first = pipeline.ask(videos[1], "What is shown?")
    second = pipeline.ask(videos[1], "What is shown?")
    assert first.cache["status"] == "miss" and second.cache["status"] == "hit"
    assert second.cache["saved_seconds"] > 0
    assert second.answer.report["seconds"]["encode"] == 0.0 and second.answer.report["cache"]["status"] == "hit"
    assert second.answer.tokens == first.answer.tokens  # same question, same tokens: same answer

    decoder, encoder = pipeline.decoders.actors[0], pipeline.encoders.actors[0]
    _, media = decoder.read.remote(str(videos[1]))
    _, fresh = encoder.encode.remote(media)
    fresh = ray.get(fresh)
    key = token_cache_key(content_hash(videos[1]), pipeline.config.model, "", pipeline._settings)
    cache = TokenCache(module_redis.url)
    cached = cache.get(key)
    cache.close()
    assert cached is not None
    assert cached.embeds.dtype == fresh.embeds.dtype
    assert cached.embeds.view(torch.uint8).equal(fresh.embeds.view(torch.uint8))  # bit for bit
    assert torch.equal(cached.mapping, fresh.mapping) and torch.equal(cached.sizes, fresh.sizes)
    assert cached.positions_per_frame == fresh.positions_per_frame and cached.timestamps == fresh.timestamps
    assert cached.meta["stages"] == fresh.meta["stages"]


def test_batch_with_a_bad_video_answers_the_rest(pipeline, videos, tmp_path):
    bad = truncated_copy(videos[2], tmp_path / "cut.mp4", 0.3)
    jobs = [Job(str(videos[2]), "Describe it."), Job(str(bad), "Describe it."), Job(str(videos[3]), "Describe it."),
            Job(str(tmp_path / "missing.mp4"), "Describe it.")]
    results = {r.job.path: r for r in pipeline.run(jobs)}
    assert set(results) == {job.path for job in jobs}
    assert results[str(videos[2])].ok and results[str(videos[3])].ok
    assert "corrupt" in results[str(bad)].error and "no such file" in results[str(tmp_path / "missing.mp4")].error.lower()


@pytest.mark.parametrize("poison", [{"seconds": {"encode": "slow"}}, {"seconds": 3}, ["not", "an", "object"],
                                    {"seconds": {}, "frames": 4}])
def test_poisoned_cache_entry_is_a_miss_deleted_and_the_cache_stays_on(pipeline, module_redis, videos, poison):
    video = videos[4]
    key = token_cache_key(content_hash(video), pipeline.config.model, "", pipeline._settings)
    good = pipeline.ask(video, "What is shown?")  # stores valid tokens under the key
    assert good.cache["status"] in ("miss", "hit")
    cache = TokenCache(module_redis.url)
    try:
        tokens = cache.get(key)
        tokens.meta = poison  # passes the schema check: only the meta is wrong
        cache.put(key, tokens)
        result = pipeline.ask(video, "What is shown?")
        assert result.ok and result.cache["status"] == "miss"
        assert pipeline.cache_state == "on"  # one bad entry does not switch the cache off
        assert cache.get(key).meta != poison  # the bad value went, the fresh tokens replaced it
        assert pipeline.ask(video, "What is shown?").cache["status"] == "hit"
    finally:
        cache.close()


def test_redis_failing_while_a_job_is_in_flight_says_unavailable(pipeline, module_redis, videos):
    client = TokenCache(module_redis.url)._client
    client.config_set("maxmemory", 1)  # reads still answer (a miss), every write fails: out of memory
    try:
        result = pipeline.ask(videos[5], "What is shown?")
    finally:
        client.config_set("maxmemory", 64 << 20)
        client.close()
        pipeline.cache_state, pipeline.cache_problem = "on", ""  # for the next test, which stops Redis
    assert result.ok and result.cache["status"] == "unavailable" and result.cache["lookup"] == "miss"
    assert "memory" in result.cache["reason"].lower()


def test_redis_going_away_mid_batch_finishes_without_the_cache(pipeline, module_redis, tmp_path, caplog):
    # Runs last in this module: it stops the module's Redis.
    videos = [changing_video(tmp_path / f"v{i}.mp4", num_frames=4, size=64, seed=500 + i) for i in range(8)]
    jobs = [Job(str(v), "Describe it.") for v in videos]
    results = []
    with caplog.at_level("WARNING", logger="pipeline.jobs"):
        for result in pipeline.run(jobs):
            results.append(result)
            if len(results) == 1:
                module_redis.stop()
    assert len(results) == len(jobs) and all(r.ok for r in results)
    assert pipeline.cache_state == "unavailable" and pipeline.cache_problem
    assert any(r.cache["status"] == "unavailable" for r in results)  # the jobs after it did not try the cache
    assert "going on without it" in caplog.text
