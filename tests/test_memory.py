"""The live token memory (dymu/memory.py) on synthetic per-frame tokens, and its Redis chunks (no model)."""
from __future__ import annotations

import pytest
import torch

from dymu.memory import append_frame, assemble, drop_oldest, evict, frames_to_drop, rows_added, rows_from_frame
from dymu.temporal import merge_frames
from dymu.tokens import InvalidTokens, MergedTokens

POSITIONS, WIDTH = 48, 16


def one_frame(embeds: torch.Tensor, mapping: torch.Tensor, time_s: float, config_hash: str = "cfg") -> MergedTokens:
    return MergedTokens(embeds=embeds, sizes=torch.bincount(mapping, minlength=embeds.shape[0]), mapping=mapping,
                        positions_per_frame=[mapping.numel()], timestamps=[time_s], config_hash=config_hash)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread spares OpenMP's start-up cost on every op (20x here under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def grouping(generator: torch.Generator) -> torch.Tensor:
    """A mapping as DToMe and the layout leave one frame: runs of neighbouring positions share one row."""
    starts = torch.rand(POSITIONS, generator=generator) < 0.6
    starts[0] = True
    return torch.cumsum(starts, 0) - 1


def grouped_frame(features: torch.Tensor, mapping: torch.Tensor, time_s: float) -> MergedTokens:
    """One frame's tokens: each row the mean of the features of the positions it stands for."""
    sizes = torch.bincount(mapping)
    embeds = torch.zeros(len(sizes), features.shape[1]).index_add_(0, mapping, features) / sizes.unsqueeze(1)
    return one_frame(embeds, mapping, time_s)


def scene(num_frames: int, static: bool, fps: float = 1.0, seed: int = 0, start: float = 0.0) -> list[MergedTokens]:
    """A static camera (one view plus sensor noise) or a busy one (a new view, grouped anew, every frame)."""
    g = torch.Generator().manual_seed(seed)
    base, base_mapping = torch.randn(POSITIONS, WIDTH, generator=g), grouping(g)
    frames = []
    for f in range(num_frames):
        if static:
            view, mapping = base + 0.02 * torch.randn(POSITIONS, WIDTH, generator=g), base_mapping
        else:
            view, mapping = torch.randn(POSITIONS, WIDTH, generator=g), grouping(g)
        frames.append(grouped_frame(view, mapping, start + f / fps))
    return frames


def fill(frames: list[MergedTokens], threshold: float = 0.9, **limits):
    memory = None
    for frame in frames:
        memory = append_frame(memory, frame, threshold)
        if limits:
            memory = evict(memory, **limits)
    return memory


@pytest.mark.parametrize("static", [True, False])
def test_appending_frame_by_frame_is_merge_frames(static):
    frames = scene(10, static, seed=3)
    memory = fill(frames)
    whole = merge_frames(frames, 0.9)
    window = assemble(memory).validate()
    assert torch.equal(window.mapping, whole.mapping)
    assert torch.equal(window.sizes, whole.sizes)
    assert torch.allclose(window.embeds, whole.embeds, atol=1e-6)
    assert window.timestamps == whole.timestamps == [float(f) for f in range(10)]
    assert [record.new_rows for record in memory.frames] == whole.rows_per_frame()


def test_static_scene_adds_far_fewer_rows_per_second_than_a_busy_one():
    seconds = 30
    static = fill(scene(seconds, static=True))
    busy = fill(scene(seconds, static=False))
    static_per_s = (rows_added(static) - static.frames[0].new_rows) / seconds
    busy_per_s = (rows_added(busy) - busy.frames[0].new_rows) / seconds
    assert busy_per_s > 10 * max(static_per_s, 0.1)
    assert static.num_rows < 2 * static.frames[0].rows  # about one frame's worth for the whole run
    assert busy.num_rows == sum(frame.num_unique for frame in scene(seconds, static=False))


def test_threshold_one_keeps_every_row():
    frames = scene(5, static=True)
    memory = fill(frames, threshold=1.0)
    assert memory.num_rows == sum(frame.num_unique for frame in frames)


def test_memory_stays_flat_over_a_long_run():
    """Half an hour of a static feed at 2 frames/s with a scene change every minute, in a 60 s window."""
    window_s, fps = 60.0, 2.0
    memory, peak_rows, peak_positions, peak_frames = None, 0, 0, 0
    for minute in range(30):
        for frame in scene(int(60 * fps), static=True, fps=fps, seed=minute, start=60.0 * minute):
            memory = evict(append_frame(memory, frame, 0.9), since=frame.timestamps[0] - window_s)
            peak_rows = max(peak_rows, memory.num_rows)
            peak_positions = max(peak_positions, memory.num_positions)
            peak_frames = max(peak_frames, memory.num_frames)
    assert memory.end - memory.start <= window_s
    assert peak_frames == int(window_s * fps) + 1
    assert peak_positions == peak_frames * POSITIONS
    assert peak_rows <= 2 * POSITIONS  # at most two scenes in a window
    assert assemble(memory).validate().num_positions == memory.num_positions


def test_budget_and_frame_cap_evict_the_oldest():
    frames = scene(40, static=False)
    memory = None
    for frame in frames:
        memory = evict(append_frame(memory, frame, 0.9), max_rows=200, max_frames=30)
        assert memory.num_rows <= 200 and memory.num_frames <= 30
        assert memory.end == frame.timestamps[0]  # the newest frame always stays
    kept = memory.num_frames
    assert memory.frames == tuple(fill(frames).frames[-kept:])
    assert kept == int(rows_from_frame(fill(frames)).le(200).sum())  # as many frames as fit the budget


def test_a_frame_over_the_budget_alone_still_stays():
    memory = fill(scene(3, static=False))
    assert frames_to_drop(memory, max_rows=1) == 2
    assert evict(memory, max_rows=1).num_frames == 1


def test_evicting_a_shared_row_shrinks_it_and_keeps_the_window_valid():
    frames = scene(6, static=True)
    memory = fill(frames)
    shared_before = memory.sizes.max()
    later = drop_oldest(memory, 4)
    tokens = assemble(later).validate()
    assert later.num_frames == 2 and tokens.positions_per_frame == [POSITIONS, POSITIONS]
    assert int(later.sizes.sum()) == 2 * POSITIONS
    assert later.sizes.max() < shared_before
    # Rows keep their running means: the same vectors, only fewer positions.
    assert torch.equal(tokens.embeds[tokens.mapping], memory.embeds[memory.mapping][4 * POSITIONS :])


def test_assemble_appends_the_newline_and_keeps_dtype():
    frames = [f.to(dtype=torch.bfloat16) for f in scene(3, static=True)]
    memory = fill(frames)
    assert memory.embeds.dtype == torch.float32  # running means in fp32
    newline = torch.ones(WIDTH)
    tokens = assemble(memory, newline, meta={"kind": "video"}).validate()
    assert tokens.embeds.dtype == torch.bfloat16
    assert tokens.num_positions == 3 * POSITIONS + 1
    assert torch.equal(tokens.embeds[tokens.mapping[-1]], newline.to(torch.bfloat16))
    assert tokens.positions_per_frame[-1] == POSITIONS + 1 and tokens.meta == {"kind": "video"}


def test_bad_frames_are_refused():
    frames = scene(2, static=True)
    memory = fill(frames[:1])
    with pytest.raises(InvalidTokens, match="older"):
        append_frame(fill(frames), frames[0], 0.9)
    other = one_frame(frames[1].embeds, frames[1].mapping, 5.0, config_hash="other")
    with pytest.raises(InvalidTokens, match="another config"):
        append_frame(memory, other, 0.9)
    two = merge_frames(frames, 0.9)
    with pytest.raises(InvalidTokens, match="one frame"):
        append_frame(memory, two, 0.9)


def test_redis_chunks_of_a_feed_stay_bounded_and_readable(redis_server):
    """An hour of feed at 1 frame/s, chunks of 10 s, a 60 s window: only the chunks the window covers stay."""
    import redis

    from pipeline.stream import ChunkStore, FeedMemory
    from workers.token_cache import TokenCache, live_source_id

    feed = "rtsp://user:secret@camera.local/stream1"
    cache = TokenCache(redis_server.url)
    chunks = ChunkStore(cache, feed, "tiny", "", {"taus": [0.9]}, chunk_s=10.0, ttl_s=80, threshold=0.9)
    memory = FeedMemory(window_s=60.0, threshold=0.9, chunks=chunks)
    client = redis.Redis.from_url(redis_server.url)
    feed_keys = f"*{live_source_id(feed, 0.0, 10.0).rsplit('-', 1)[0]}-*"  # every chunk of this feed
    most_keys = 0
    for minute in range(60):
        memory.add(scene(60, static=True, seed=minute, start=60.0 * minute))
        keys = list(client.scan_iter(match=feed_keys, count=1000))
        most_keys = max(most_keys, len(keys))
    assert memory.state.num_frames == 61
    assert len(chunks.keys()) <= 7  # chunks ending after the window's start
    assert most_keys <= 2 * 7  # a manifest and one part each
    assert all(0 < client.ttl(key) <= 80 for key in keys)
    assert "secret" not in " ".join(key.decode() for key in keys)
    newest = cache.get(chunks.keys()[-1]).validate()  # a whole chunk, temporally merged, readable by anyone
    assert newest.num_frames == 10 and newest.timestamps[0] == 3580.0  # the last closed chunk
    assert newest.num_unique < 2 * POSITIONS
    cache.close()
