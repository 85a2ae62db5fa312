"""Adapter for the Hugging Face Llama decoder (the LLM of LLaVA-1.5).

Llama is the reference layout the shared layer functions are written for: optional attention / MLP biases
live inside the ``nn.Linear`` modules and Llama-3 style RoPE scaling lives inside ``rotary_emb``, so nothing
needs translating.
"""
from __future__ import annotations

from torch import nn

from dymu.llm.decoder import Decoder


def decoder_from(language_model: nn.Module, lm_head: nn.Module, eos_token_ids: tuple[int, ...]) -> Decoder:
    return Decoder.from_hf(language_model, lm_head, eos_token_ids)
