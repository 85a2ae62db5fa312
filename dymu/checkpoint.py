"""What a checkpoint is, told from its config.json alone, without torch or transformers.

Reading a config through transformers imports torch (seconds), which is too slow for checking a user's options
before anything starts. A local checkpoint folder's config.json is read here as plain JSON instead; anything it
does not say (a hub id, a field left at its class default) is read the slow way by ``dymu.families``.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dymu.errors import DymuError

# config.model_type of the checkpoints dymu has a family adapter for (dymu.families.FAMILIES, which imports torch)
MODEL_TYPES = ("llava_onevision", "llava", "qwen2_5_vl", "qwen3_vl")

# config.model_type of the vision towers DToMe has an adapter for -> the encoder family's name
TOWER_FAMILIES = {"siglip_vision_model": "siglip", "clip_vision_model": "clip"}


def layers_to_run(feature_layer: int, num_layers: int) -> int:
    """How many layers produce ``hidden_states[feature_layer]`` (entry 0 is the embeddings)."""
    count = num_layers + 1
    if not isinstance(feature_layer, int) or not -count <= feature_layer < count:
        raise DymuError(f"vision feature layer {feature_layer!r} does not exist in a {num_layers}-layer encoder")
    return feature_layer % count


class ModelNotAvailable(DymuError):
    """The checkpoint could not be found locally or fetched."""


def check_model_type(model_id: str, model_type: Any) -> str:
    """``model_type`` if dymu supports it, else a DymuError naming what is wrong."""
    if model_type is None:
        raise ModelNotAvailable(f"{model_id}: config.json has no \"model_type\", so it names no model "
                                f"(expected one of {', '.join(MODEL_TYPES)})")
    if model_type not in MODEL_TYPES:
        raise DymuError(f"{model_id} is a {model_type!r} model; supported: {', '.join(MODEL_TYPES)}")
    return model_type


def local_config(model_id: str) -> SimpleNamespace | None:
    """The config.json of a local checkpoint folder, as attributes (nested configs too), checked to name a family
    dymu supports; None when ``model_id`` is not a folder with a config.json (a hub id)."""
    path = Path(model_id) / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelNotAvailable(f"{model_id}: config.json is not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelNotAvailable(f"{model_id}: config.json is not a JSON object")
    check_model_type(model_id, raw.get("model_type"))
    return json.loads(json.dumps(raw), object_hook=lambda fields: SimpleNamespace(**fields))
