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
from dymu.files import parse_json

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


# What transformers loads weights from in a local folder: one file, or an index naming its shards.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_weights(model_id: str) -> None:
    """Raise unless the checkpoint folder ``model_id`` holds weights: a weights file, or an index whose shards are
    all there. Loading a folder without them fails only after the seconds Ray and torch take to start."""
    folder = Path(model_id)
    if any((folder / name).is_file() for name in WEIGHT_FILES):
        return
    for name in WEIGHT_INDEXES:
        if (folder / name).is_file():
            try:
                shards = set(parse_json((folder / name).read_bytes(), f"{model_id}: {name}")["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelNotAvailable(f"{model_id}: {name} is not a readable weights index ({exc})") from None
            missing = sorted(str(shard) for shard in shards if not (folder / str(shard)).is_file())
            if missing:
                raise ModelNotAvailable(f"{model_id}: {name} names {len(missing)} weight file(s) the folder does "
                                        f"not have ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
            return
    raise ModelNotAvailable(f"{model_id}: the folder has a config.json but no weights ({' or '.join(WEIGHT_FILES)}, "
                            f"or a sharded index of them)")


def local_config(model_id: str) -> SimpleNamespace | None:
    """The config.json of a local checkpoint folder, as attributes (nested configs too), checked to name a family
    dymu supports and to come with weights; None when ``model_id`` is not a folder (a hub id)."""
    folder = Path(model_id)
    if not folder.is_dir():
        return None
    path = folder / "config.json"
    if not path.is_file():
        raise ModelNotAvailable(f"{model_id}: the folder has no config.json, so it is not a checkpoint")
    try:
        raw = parse_json(path.read_bytes(), f"{model_id}: config.json")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelNotAvailable(f"{model_id}: config.json is not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelNotAvailable(f"{model_id}: config.json is not a JSON object")
    check_model_type(model_id, raw.get("model_type"))
    check_weights(model_id)
    return json.loads(json.dumps(raw), object_hook=lambda fields: SimpleNamespace(**fields))
