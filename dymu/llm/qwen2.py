"""Adapter for the Hugging Face Qwen2 decoder (the LLM of LLaVA-OneVision).

Qwen2 is the Llama layout with biases on q/k/v; the biases live inside the ``nn.Linear`` modules, so the
shared layer functions need nothing special. What differs is that a Qwen2 config may turn on sliding-window
attention for some layers, which the full-length VTU attention does not implement.
"""
from __future__ import annotations

from torch import nn

from dymu.errors import DymuError
from dymu.llm.decoder import Decoder


def decoder_from(language_model: nn.Module, lm_head: nn.Module, eos_token_ids: tuple[int, ...]) -> Decoder:
    layer_types = getattr(language_model.config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise DymuError("Qwen2 models with sliding-window layers are not supported (use_sliding_window must be off)")
    return Decoder.from_hf(language_model, lm_head, eos_token_ids)
