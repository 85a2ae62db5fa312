"""Tiny random decoders and prompts with merged visual blocks, shared by the LLM-side tests."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dymu.llm import VirtualSequence

FAMILIES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def tiny_decoder(family: str, seed: int = 0, layers: int = 2, **overrides) -> torch.nn.Module:
    """A 64-wide grouped-query decoder with random weights and no EOS (answers run to max_new_tokens)."""
    config_cls, model_cls = FAMILIES[family]
    options = dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=256, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    options.update(overrides)
    torch.manual_seed(seed)
    return model_cls(config_cls(**options)).eval()


def merged_prompt(model: torch.nn.Module, seed: int = 0, before: int = 6, groups: int = 8, group_size: int = 3,
                  after: int = 5) -> VirtualSequence:
    """text, a visual block of ``groups * group_size`` positions whose neighbours share a row, text.

    The shared rows are exact duplicates in the unmerged prompt, so merging them loses nothing at the input.
    """
    generator = torch.Generator().manual_seed(seed)
    vocab, width = model.config.vocab_size, model.config.hidden_size
    embed = model.get_input_embeddings()
    with torch.no_grad():
        text_before = embed(torch.randint(0, vocab, (before,), generator=generator))
        text_after = embed(torch.randint(0, vocab, (after,), generator=generator))
    visual_rows = torch.randn(groups, width, generator=generator) * embed.weight.std()
    rows = torch.cat([text_before, visual_rows, text_after])
    visual_map = before + torch.arange(groups).repeat_interleave(group_size)
    mapping = torch.cat([torch.arange(before), visual_map, before + groups + torch.arange(after)])
    visual = torch.zeros(mapping.shape[0], dtype=torch.bool)
    visual[before: before + groups * group_size] = True
    return VirtualSequence(rows, mapping, visual)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Decoding a 64-wide model is hundreds of tiny ops; on a shared 2-core machine extra threads only
    contend, so these tests run single-threaded (and put the setting back)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
