"""Adapters for the text decoders of Qwen2.5-VL (Qwen2 layers) and Qwen3-VL (Qwen3 layers: q/k norms).

Both use M-RoPE: a position is a (t, h, w) index and the rotary module builds its rotation from the three
axes (Qwen2.5-VL by contiguous frequency sections, Qwen3-VL interleaved). The layers themselves are the
Llama layout the shared layer functions run on; ``project_qkv`` applies Qwen3's per-head q/k norms.
"""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from dymu.errors import DymuError
from dymu.llm.decoder import Decoder


def decoder_from(language_model: nn.Module, lm_head: nn.Module, eos_token_ids: tuple[int, ...]) -> Decoder:
    config = language_model.config
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or any(kind != "full_attention" for kind in layer_types):
        raise DymuError("Qwen-VL models with sliding-window layers are not supported (use_sliding_window must be off)")
    return replace(Decoder.from_hf(language_model, lm_head, eos_token_ids), mrope=True)


ADAPTERS = {"qwen2_5_vl_text": decoder_from, "qwen3_vl_text": decoder_from}
