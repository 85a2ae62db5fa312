"""The generation loop: greedy tokens identical to transformers' generate, sampling, stopping, streaming,
and what the result reports."""
from __future__ import annotations

import pytest
import torch

from dymu.errors import DymuError
from dymu.llm import GenerateConfig, Generation, PruneConfig, build_sequence, generate
from tests.llm_models import merged_prompt, single_thread, tiny_decoder  # noqa: F401 (fixture)

PROMPT = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3))


class LetterTokenizer:
    """Token t decodes to one letter: enough to exercise stop strings without a real vocabulary."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + t % 26) for t in ids)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_greedy_tokens_identical_to_transformers_generate(family):
    model = tiny_decoder(family)
    result = generate(model, build_sequence(model, [PROMPT]), GenerateConfig(max_new_tokens=32))
    with torch.no_grad():
        stock = model.generate(PROMPT[None], max_new_tokens=32, do_sample=False)[0, PROMPT.shape[0]:]
    assert result.tokens == stock.tolist()
    assert len(set(result.tokens)) > 4  # a random model that repeats one token would prove little
    assert result.stop_reason == "max_new_tokens"


def test_result_reports_lengths_and_times():
    model = tiny_decoder("qwen2")
    sequence = merged_prompt(model)
    result = generate(model, sequence, GenerateConfig(max_new_tokens=6))
    assert (result.virtual_length, result.unique_rows, result.visual_positions) == (35, 19, 24)
    assert result.prefill_seconds > 0 and len(result.decode_seconds) == 5
    assert all(t > 0 for t in result.decode_seconds) and result.decode_ms_per_token > 0
    assert result.cache_entries == [35 + 5, 35 + 5] and result.kept_trace == []
    no_vtu = generate(model, sequence, GenerateConfig(max_new_tokens=6, prefill="no_vtu"))
    assert no_vtu.cache_entries == [19 + 5, 19 + 5]


def test_streaming_yields_the_same_tokens():
    model = tiny_decoder("llama")
    sequence = merged_prompt(model)
    config = GenerateConfig(max_new_tokens=12)
    seen = []
    result = generate(model, sequence, config, on_token=seen.append)
    generation = Generation(model, sequence, config)
    streamed = list(generation)
    assert seen == result.tokens == streamed == generation.result.tokens


def test_sampling_is_seeded_and_top_p_narrows_to_greedy():
    model = tiny_decoder("qwen2")
    sequence = merged_prompt(model)
    greedy = generate(model, sequence, GenerateConfig(max_new_tokens=16)).tokens
    sample = GenerateConfig(max_new_tokens=16, do_sample=True, temperature=1.5, seed=7)
    first, second = generate(model, sequence, sample).tokens, generate(model, sequence, sample).tokens
    assert first == second and first != greedy
    nucleus = GenerateConfig(max_new_tokens=16, do_sample=True, top_p=1e-6, seed=1)
    assert generate(model, sequence, nucleus).tokens == greedy


def test_stops_on_eos_and_stop_strings():
    model = tiny_decoder("llama")
    sequence = merged_prompt(model)
    greedy = generate(model, sequence, GenerateConfig(max_new_tokens=20)).tokens
    at = next(i for i in range(3, 20) if greedy[i] not in greedy[:i])
    eos = generate(model, sequence, GenerateConfig(max_new_tokens=20, eos_token_ids=(greedy[at],)))
    assert eos.tokens == greedy[: at + 1] and eos.stop_reason == "eos"

    tokenizer = LetterTokenizer()
    stop = tokenizer.decode(greedy[at - 1: at + 1])
    config = GenerateConfig(max_new_tokens=20, stop_strings=(stop,))
    result = generate(model, sequence, config, tokenizer=tokenizer)
    assert result.stop_reason == "stop_string"
    full_text = tokenizer.decode(greedy)
    assert result.text == full_text[: full_text.find(stop)]
    assert result.tokens == greedy[: len(result.tokens)] and len(result.tokens) <= at + 1
    with pytest.raises(DymuError, match="tokenizer"):
        generate(model, sequence, config)


def test_stops_when_the_context_is_full():
    model = tiny_decoder("qwen2", max_position_embeddings=48)
    result = generate(model, build_sequence(model, [PROMPT]), GenerateConfig(max_new_tokens=20))
    # The prompt fills positions 0..39; generated tokens are fed at 40..47, the ninth has no room.
    assert result.stop_reason == "context_full" and len(result.tokens) == 9


@pytest.mark.parametrize(
    "options",
    [
        dict(max_new_tokens=0),
        dict(do_sample=True, temperature=0.0),
        dict(top_p=0.0),
        dict(prefill="bogus"),
        dict(stop_strings="stop"),
        dict(prune=PruneConfig(enabled=True, layer=1)),
    ],
)
def test_bad_options_are_clear_errors(options):
    model = tiny_decoder("llama")
    with pytest.raises(DymuError):
        generate(model, merged_prompt(model), GenerateConfig(**options))
