"""One thin adapter per VLM family; `load_family` picks it from the checkpoint's config."""
from __future__ import annotations

import torch

from dymu.errors import DymuError
from dymu.families.base import ModelNotAvailable, Prompt, VLMFamily, load_pretrained, resolve_device_dtype
from dymu.families.llava import LlavaFamily
from dymu.families.onevision import OneVisionFamily
from dymu.families.qwen_vl import Qwen3VLFamily, Qwen25VLFamily, QwenVLFamily

FAMILIES = {"llava_onevision": OneVisionFamily, "llava": LlavaFamily, "qwen2_5_vl": Qwen25VLFamily,
            "qwen3_vl": Qwen3VLFamily}


def load_family(
    model_id: str, device: str | None = "auto", dtype: str | torch.dtype | None = "auto", revision: str | None = None
) -> VLMFamily:
    """Load a checkpoint (hub id or local folder) and wrap it in its family adapter."""
    from transformers import AutoConfig

    config = load_pretrained(AutoConfig, model_id, revision)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise DymuError(
            f"{model_id} is a {config.model_type!r} model; supported: LLaVA-OneVision, LLaVA-1.5, Qwen2.5-VL "
            f"and Qwen3-VL checkpoints"
        )
    dev, dt = resolve_device_dtype(device, dtype)
    return family.load(model_id, dev, dt, revision)


__all__ = ["FAMILIES", "LlavaFamily", "ModelNotAvailable", "OneVisionFamily", "Prompt", "Qwen25VLFamily",
           "Qwen3VLFamily", "QwenVLFamily", "VLMFamily", "load_family"]
