"""DyRate-style pruning: the cache shrinks as the schedule says, text survives, the most attended visual
entries are the ones kept, long answers run to the end, and keeping everything changes nothing."""
from __future__ import annotations

import math

import pytest
import torch

from dymu.llm import (
    AttentionFallRule,
    AttentionStats,
    GenerateConfig,
    KVCache,
    LinearSchedule,
    PruneConfig,
    Pruner,
    generate,
)
from dymu.errors import DymuError
from dymu.llm.generate import Generation
from dymu.llm.prune import attention_stats, entries_to_keep
from dymu.llm.rate_model import AttentionTrace, LearnedRate, keep_targets, record_trace
from tests.llm_models import merged_prompt, single_thread, tiny_decoder  # noqa: F401 (fixture)


class Fixed:
    """A predictor that always answers the same fraction."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def keep_fraction(self, stats: AttentionStats) -> float:
        return self.fraction


def test_cache_shrinks_as_the_schedule_says_and_text_survives():
    model = tiny_decoder("qwen2", layers=3)
    sequence = merged_prompt(model)  # 6 text, 24 visual (8 rows), 5 text
    prune = PruneConfig(enabled=True, layer=0, start_step=4, interval=4, min_keep=0.25)
    generation = Generation(model, sequence, GenerateConfig(max_new_tokens=30, prune=prune),
                            predictor=LinearSchedule(start=3, end=15, final=0.0))
    tokens = list(generation)
    result, cache = generation.result, generation.cache

    expected = [(1, 24)]
    for step in range(4, 30, 4):
        fraction = max(0.25, 1.0 - min(1.0, (step - 3) / 12))
        target = math.ceil(fraction * 24)
        if target < expected[-1][1]:
            expected.append((step, target))
    assert result.kept_trace == expected == [(1, 24), (4, 22), (8, 14), (12, 6)]

    generated = len(tokens) - 1  # the last token is never fed back
    assert result.cache_entries == [35 + generated, 11 + 6 + generated, 11 + 6 + generated]
    text_positions = set(range(6)) | set(range(30, 35 + generated))
    for layer in (1, 2):
        positions = set(cache.positions(layer).tolist())
        assert text_positions <= positions
        assert cache.num_visual(layer) == 6 and cache.keys(layer).shape[1] == len(positions)
        assert torch.equal(cache.positions(layer), cache.positions(1))
    assert cache.num_visual(0) == 24  # the probe layer itself is never pruned


@pytest.mark.parametrize("offset", [0, -6])
def test_pruner_keeps_the_most_attended_visual_entries(offset):
    """offset -6: M-RoPE prompts record entry ids ending below the first decode position, some negative."""
    cache = KVCache(num_layers=3, num_kv_heads=1, head_dim=2, capacity=4, device="cpu", dtype=torch.float32)
    visual = torch.tensor([False] + [True] * 8 + [False])
    for layer in range(3):
        cache.append(layer, torch.randn(10, 1, 2), torch.randn(10, 1, 2), torch.arange(10) + offset, visual)
    pruner = Pruner(PruneConfig(enabled=True, layer=0, start_step=1, interval=1, min_keep=0.0), 3, Fixed(0.5))
    weights = torch.tensor([0.3, 0.01, 0.2, 0.02, 0.15, 0.03, 0.1, 0.04, 0.05, 0.1])
    pruner.observe(1, weights, cache)
    kept = [p + offset for p in [0, 2, 4, 6, 8, 9]]
    assert cache.positions(1).tolist() == kept == cache.positions(2).tolist()
    assert cache.length(0) == 10 and cache.capacity(0) >= 10

    # Later decisions choose among the survivors only, by the new attention.
    pruner.predictor = Fixed(0.25)
    pruner.observe(2, torch.tensor([0.1, 0.3, 0.01, 0.3, 0.02, 0.01, 0.2, 0.01, 0.03, 0.02]), cache)
    assert cache.positions(1).tolist() == [p + offset for p in [0, 6, 8, 9]]
    assert pruner.trace == [(1, 8), (1, 4), (2, 2)]
    kept_keys = cache.keys(2)
    assert kept_keys.shape == (1, 4, 2)


def test_keeping_everything_is_bit_identical_and_pruning_off_runs_no_pruning_code(monkeypatch):
    model = tiny_decoder("llama", layers=3)
    sequence = merged_prompt(model)
    plain = generate(model, sequence, GenerateConfig(max_new_tokens=24, keep_logits=True))
    keep_all = PruneConfig(enabled=True, layer=1, start_step=1, interval=1, min_keep=0.0)
    probed = generate(model, sequence, GenerateConfig(max_new_tokens=24, keep_logits=True, prune=keep_all),
                      predictor=Fixed(1.0))
    assert probed.kept_trace == [(1, 24)]
    assert probed.tokens == plain.tokens
    assert all(torch.equal(a, b) for a, b in zip(probed.logits, plain.logits))

    def no_pruning(*args, **kwargs):
        raise AssertionError("pruning code ran with pruning off")

    monkeypatch.setattr(Pruner, "observe", no_pruning)
    off = generate(model, sequence, GenerateConfig(max_new_tokens=24, keep_logits=True))
    assert all(torch.equal(a, b) for a, b in zip(off.logits, plain.logits))


def test_pruning_changes_the_answer_only_after_it_starts():
    model = tiny_decoder("qwen2", layers=3)
    sequence = merged_prompt(model)
    plain = generate(model, sequence, GenerateConfig(max_new_tokens=20, keep_logits=True))
    prune = PruneConfig(enabled=True, layer=0, start_step=10, interval=100, min_keep=0.1)
    pruned = generate(model, sequence, GenerateConfig(max_new_tokens=20, keep_logits=True, prune=prune),
                      predictor=Fixed(0.0))
    assert pruned.kept_trace == [(1, 24), (10, 3)]
    # Logit i comes from the forward pass of step i (0 = prefill); step 10 is the first without 21 entries.
    assert all(torch.equal(pruned.logits[i], plain.logits[i]) for i in range(10))
    assert not torch.equal(pruned.logits[10], plain.logits[10])


@pytest.mark.parametrize("predictor", [None, LinearSchedule(start=1, end=200, final=0.1)])
def test_long_answer_runs_to_the_end(predictor):
    model = tiny_decoder("qwen2", layers=3)
    sequence = merged_prompt(model, groups=20, group_size=10)  # 200 visual positions
    prune = PruneConfig(enabled=True, layer=1, start_step=8, interval=8, min_keep=0.1)
    result = generate(model, sequence, GenerateConfig(max_new_tokens=400, prune=prune), predictor=predictor)
    assert len(result.tokens) == 400 and result.stop_reason == "max_new_tokens"
    kept = [count for _, count in result.kept_trace]
    assert kept == sorted(kept, reverse=True) and kept[-1] >= 20
    assert result.cache_entries[2] == 11 + kept[-1] + 399
    if predictor is not None:
        assert kept[-1] == 20


def test_training_free_rule():
    stats = AttentionStats(step=9, visual_mass=0.3, first_visual_mass=0.6, visual_entropy=math.log(25),
                           num_visual=100, num_kept=100)
    assert stats.mass_ratio == pytest.approx(0.5) and stats.spread == pytest.approx(0.25)
    assert AttentionFallRule().keep_fraction(stats) == pytest.approx(0.5)
    assert AttentionFallRule(sharpness=2.0).keep_fraction(stats) == pytest.approx(0.25)
    assert AttentionFallRule(entropy_weight=1.0).keep_fraction(stats) == pytest.approx(0.25)
    assert AttentionFallRule(entropy_weight=0.5).keep_fraction(stats) == pytest.approx(math.sqrt(0.5 * 0.25))
    rising = AttentionStats(9, 0.9, 0.6, 0.0, 100, 100)
    assert AttentionFallRule().keep_fraction(rising) == 1.0


def test_attention_stats_and_entry_selection():
    weights = torch.tensor([0.5, 0.25, 0.25, 0.0])
    visual = torch.tensor([False, True, True, False])
    stats = attention_stats(3, weights, visual, first_visual_mass=1.0, num_kept=2)
    assert stats.visual_mass == pytest.approx(0.5) and stats.visual_entropy == pytest.approx(math.log(2))
    assert stats.mass_ratio == pytest.approx(0.5)
    scores = torch.tensor([0.0, 0.9, 0.1, 0.0, 0.5])
    flags = torch.tensor([False, True, True, False, True])
    assert entries_to_keep(flags, scores, 1).tolist() == [0, 1, 3]
    assert entries_to_keep(flags, scores, 0).tolist() == [0, 3]


def test_keep_targets_cover_the_coming_steps():
    trace = AttentionTrace(
        stats=[AttentionStats(1, 1.0, 1.0, 0.0, 4, 4), AttentionStats(2, 1.0, 1.0, 0.0, 4, 4)],
        visual_weights=[torch.tensor([0.7, 0.2, 0.05, 0.05]), torch.tensor([0.05, 0.05, 0.2, 0.7])],
    )
    now_only = [target for _, target in keep_targets(trace, coverage=0.9, horizon=0)]
    assert now_only == [0.5, 0.5]
    # Ranked by step 1's attention, keeping 90% of step 2's needs every entry.
    with_future = [target for _, target in keep_targets(trace, coverage=0.9, horizon=1)]
    assert with_future == [1.0, 0.5]


def test_record_fit_save_and_use_a_learned_predictor(tmp_path):
    model = tiny_decoder("qwen2", layers=3)
    sequence = merged_prompt(model, groups=10, group_size=4)
    trace = record_trace(model, sequence, layer=0, max_new_tokens=30)
    assert len(trace.stats) == 29 and trace.visual_weights[0].shape == (40,)
    assert trace.visual_weights[5].sum().item() == pytest.approx(trace.stats[5].visual_mass, rel=1e-5)
    trace.save(tmp_path / "a.trace")
    assert AttentionTrace.load(tmp_path / "a.trace").stats == trace.stats

    predictor = LearnedRate(hidden=8)
    samples = [(AttentionStats(s, m, 0.8, 2.0, 100, 100), min(1.0, m / 0.8)) for s in range(1, 60, 3)
               for m in (0.2, 0.4, 0.6, 0.8)]
    assert predictor.fit(samples, epochs=300) < 0.005
    assert predictor.keep_fraction(AttentionStats(20, 0.4, 0.8, 2.0, 100, 100)) == pytest.approx(0.5, abs=0.1)
    predictor.save(tmp_path / "rate.safetensors")
    loaded = LearnedRate.load(tmp_path / "rate.safetensors")
    assert loaded.keep_fraction(samples[0][0]) == predictor.keep_fraction(samples[0][0])
    with pytest.raises(DymuError, match="not a dymu-rate-predictor"):
        LearnedRate.load(tmp_path / "a.trace")

    prune = PruneConfig(enabled=True, layer=0, start_step=4, interval=4, predictor=str(tmp_path / "rate.safetensors"))
    result = generate(model, sequence, GenerateConfig(max_new_tokens=20, prune=prune))
    assert len(result.tokens) == 20 and result.kept_trace[0] == (1, 40)


def test_fit_rate_command(tmp_path):
    from pipeline.cli import main

    model = tiny_decoder("llama", layers=3)
    record_trace(model, merged_prompt(model), layer=1, max_new_tokens=40).save(tmp_path / "t.trace")
    out = tmp_path / "rate.safetensors"
    assert main(["fit-rate", str(tmp_path / "t.trace"), "--out", str(out), "--epochs", "50"]) == 0
    assert isinstance(LearnedRate.load(out), LearnedRate)
    assert main(["fit-rate", str(tmp_path / "missing.trace"), "--out", str(out)]) == 2
