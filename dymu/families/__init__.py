"""One thin adapter per VLM family; `load_family` picks it from the checkpoint's config."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from dymu.checkpoint import MODEL_TYPES, check_model_type
from dymu.families.base import (
    ModelNotAvailable,
    Prompt,
    VLMFamily,
    check_device,
    load_pretrained,
    read_config_file,
    resolve_device_dtype,
)
from dymu.families.llava import LlavaFamily
from dymu.families.onevision import OneVisionFamily
from dymu.families.qwen_vl import Qwen3VLFamily, Qwen25VLFamily, QwenVLFamily

if TYPE_CHECKING:
    import torch

FAMILIES = {"llava_onevision": OneVisionFamily, "llava": LlavaFamily, "qwen2_5_vl": Qwen25VLFamily,
            "qwen3_vl": Qwen3VLFamily}
assert tuple(FAMILIES) == MODEL_TYPES, "dymu.checkpoint.MODEL_TYPES must name the families here"


def load_family(
    model_id: str, device: str | None = "auto", dtype: str | torch.dtype | None = "auto", revision: str | None = None
) -> VLMFamily:
    """Load a checkpoint (hub id or local folder) and wrap it in its family adapter."""
    config = checkpoint_config(model_id, revision)
    dev, dt = resolve_device_dtype(device, dtype)
    return FAMILIES[config.model_type].load(model_id, dev, dt, revision)


def checkpoint_config(model_id: str, revision: str | None = None) -> Any:
    """The checkpoint's config (its config.json only, no weights), checked to be a family dymu supports."""
    from transformers import AutoConfig

    try:
        config = load_pretrained(AutoConfig, model_id, revision)
    except ValueError as exc:  # transformers cannot tell what model the config.json describes
        raw = read_config_file(model_id, "config.json", revision)
        try:
            model_type = json.loads(raw).get("model_type") if raw else None
        except (json.JSONDecodeError, AttributeError):
            raise ModelNotAvailable(f"{model_id}: config.json is not a JSON object") from exc
        check_model_type(model_id, model_type)
        raise ModelNotAvailable(f"{model_id}: model_type {model_type!r} is unknown to this transformers; "
                                f"supported: {', '.join(FAMILIES)}") from exc
    check_model_type(model_id, config.model_type)
    return config


__all__ = ["FAMILIES", "LlavaFamily", "ModelNotAvailable", "OneVisionFamily", "Prompt", "Qwen25VLFamily",
           "Qwen3VLFamily", "QwenVLFamily", "VLMFamily", "check_device", "checkpoint_config", "load_family"]
