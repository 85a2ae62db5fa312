"""The engine's decode attention backends: FlexAttention on the paged pool equals the gathered SDPA on ragged,
shared and pruned layouts, and an engine run with either writes the same greedy answers."""
from __future__ import annotations

import pytest
import torch

from dymu.config import make_config
from dymu.engine import Engine, EngineConfig
from dymu.engine.attention import FlexDecodeAttention, SdpaDecodeAttention, paged_membership, resolve_backend
from dymu.engine.block_manager import BlockManager
from dymu.errors import DymuError
from tests.llm_models import single_thread, tiny_decoder  # noqa: F401 (fixture)
from tests.test_engine import budget_gb, mixed_requests


def ragged_slots(pool: BlockManager, generator: torch.Generator) -> list[torch.Tensor]:
    """Sequences laid out as the engine lays them: runs of whole blocks with a partly filled tail, a prefix
    shared by two sequences, a keep list scattered inside blocks (pruning with no room to compact), one entry."""
    bs = pool.block_size
    blocks = torch.randperm(pool.num_blocks, generator=generator).tolist()

    def run(count: int, entries: int) -> torch.Tensor:
        taken = [blocks.pop() for _ in range(count)]
        return pool.slots(taken, entries)

    shared = run(3, 3 * bs)  # a cached visual prefix: whole blocks, read by two sequences
    kept = run(4, 4 * bs)
    keep = kept[torch.randperm(kept.shape[0], generator=generator)[: 2 * bs + 1].sort().values]
    return [
        run(3, 2 * bs + 1),
        torch.cat([shared, run(1, 2)]),
        torch.cat([shared, run(2, bs + 3)]),
        keep,
        run(1, 1),
        run(6, 5 * bs + bs - 1),
    ]


@pytest.mark.parametrize("seed,block_size,heads,kv_heads", [(0, 4, 4, 2), (1, 8, 6, 2), (2, 16, 4, 4), (3, 4, 8, 1)])
def test_flex_equals_sdpa_on_ragged_paged_sequences(seed, block_size, heads, kv_heads):
    generator = torch.Generator().manual_seed(seed)
    head_dim = 16
    pool = BlockManager(64, block_size, kv_heads, head_dim, "cpu", torch.float32)
    flex = FlexDecodeAttention(torch.device("cpu"))
    flex.prepare(pool)
    slots = ragged_slots(pool, generator)
    written = torch.cat(slots).unique()
    pool.write(written, torch.randn(written.shape[0], kv_heads, head_dim, generator=generator),
               torch.randn(written.shape[0], kv_heads, head_dim, generator=generator))
    q = torch.randn(len(slots), heads, head_dim, generator=generator)
    expected = SdpaDecodeAttention()(q, pool, slots, 0.25)
    got = flex(q, pool, slots, 0.25)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # And against attention written out by hand for one sequence (the keep list).
    b = 3
    keys = pool.keys[slots[b]].repeat_interleave(heads // kv_heads, dim=1)  # (n, Hq, hd)
    values = pool.values[slots[b]].repeat_interleave(heads // kv_heads, dim=1)
    weights = torch.softmax(torch.einsum("hd,nhd->hn", q[b], keys) * 0.25, dim=-1)
    torch.testing.assert_close(got[b], torch.einsum("hn,nhd->hd", weights, values).reshape(-1), rtol=1e-5, atol=1e-5)


def test_flex_falls_back_to_sdpa_only_if_its_first_call_fails():
    generator = torch.Generator().manual_seed(7)
    pool = BlockManager(64, 4, 2, 16, "cpu", torch.float32)
    slots = ragged_slots(pool, generator)
    written = torch.cat(slots).unique()
    pool.write(written, torch.randn(written.shape[0], 2, 16, generator=generator),
               torch.randn(written.shape[0], 2, 16, generator=generator))
    q = torch.randn(len(slots), 4, 16, generator=generator)
    expected = SdpaDecodeAttention()(q, pool, slots, 0.25)

    def no_kernel(*args, **kwargs):
        raise RuntimeError("no kernel for this GPU")

    broken = FlexDecodeAttention(torch.device("cpu"))
    broken._flex = no_kernel
    torch.testing.assert_close(broken(q, pool, slots, 0.25), expected)  # warned, then SDPA
    assert broken.name == "sdpa"
    torch.testing.assert_close(broken(q, pool, slots, 0.25), expected)

    working = FlexDecodeAttention(torch.device("cpu"))
    working(q, pool, slots, 0.25)
    working._flex = no_kernel
    with pytest.raises(RuntimeError, match="no kernel"):  # after a first success, a failure is a failure
        working(q, pool, slots, 0.25)
    assert working.name == "flex"


def test_the_block_mask_lists_each_sequences_own_blocks():
    pool = BlockManager(10, 4, 1, 2, "cpu", torch.float32)
    slots = [torch.tensor([8, 9, 10, 13]), torch.tensor([0, 1, 2, 3, 8, 9]), torch.tensor([39])]
    num_blocks, indices, local, member = paged_membership(slots, 4, 10)
    assert num_blocks.flatten().tolist() == [2, 2, 1]
    assert [indices[b, 0, 0, : int(n)].tolist() for b, n in enumerate(num_blocks.flatten())] == [[2, 3], [0, 2], [9]]
    assert (local >= 0).sum() == 4  # blocks 0, 2, 3, 9 are touched
    row = local[2]
    assert member[0, row * 4: row * 4 + 4].tolist() == [True, True, True, False]  # slot 11 is not sequence 0's
    assert member[1, row * 4: row * 4 + 4].tolist() == [True, True, False, False]
    assert int(member.sum()) == sum(s.shape[0] for s in slots)


def test_an_engine_on_flex_writes_the_same_answers_as_on_sdpa(single_thread):
    model = tiny_decoder("qwen2", layers=3)
    requests = mixed_requests(model)  # ragged prompts, merged and not, pruning, sampling, joining mid-way
    results = {}
    for backend in ("sdpa", "flex"):
        engine = Engine(model, None, EngineConfig(kv_cache_gb=budget_gb(model, 400, 4), block_size=4,
                                                  prefill_chunk=8, max_batch=4, attention=backend))
        assert engine.stats()["attention"] == backend
        ids = [engine.add_request(*request) for request in requests[:3]]
        for _ in range(3):
            engine.step()
        ids += [engine.add_request(*request) for request in requests[3:]]
        finished = engine.run()
        results[backend] = [finished[i] for i in ids]
    for ours, theirs in zip(results["flex"], results["sdpa"]):
        assert ours.tokens == theirs.tokens and ours.kept_trace == theirs.kept_trace
        for a, b in zip(ours.logits, theirs.logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert any(r.kept_trace for r in results["flex"])  # pruned layouts were decoded too


def test_the_backend_option_is_checked_and_auto_means_sdpa_on_cpu():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("flex", "cpu") == "flex"
    assert make_config("mid").attention_backend == "auto"
    assert make_config("mid", attention_backend="flex").attention_backend == "flex"
    with pytest.raises(DymuError, match="attention_backend must be one of auto, sdpa, flex, got 'fast'"):
        make_config("mid", attention_backend="fast")
    with pytest.raises(DymuError, match="attention must be one of"):
        EngineConfig(attention="flash")
