"""What every VLM family adapter provides, and the loading code they share.

An adapter is thin: it names where the model keeps its parts (vision tower, projector, LLM), turns frames
and images into the pixel tensors the model expects, reads the model's encoder-to-LLM position map, and
builds the chat prompt around the visual placeholder. Everything else in dymu works on those.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from dymu.checkpoint import ModelNotAvailable
from dymu.errors import DymuError
from dymu.layout import PositionMap

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    """Token ids of the chat prompt on either side of the one visual placeholder."""

    before: list[int]
    after: list[int]


class VLMFamily(Protocol):
    """The capabilities dymu needs from a vision-language model family."""

    name: str
    model: torch.nn.Module
    tokenizer: Any
    supports_video: bool

    @property
    def vision_tower(self) -> torch.nn.Module: ...
    @property
    def feature_layer(self) -> int: ...
    @property
    def language_model(self) -> torch.nn.Module: ...
    @property
    def lm_head(self) -> torch.nn.Module: ...
    @property
    def newline(self) -> torch.Tensor | None: ...

    def project(self, features: torch.Tensor) -> torch.Tensor: ...
    def frame_pixels(self, frames: np.ndarray) -> torch.Tensor: ...
    def image_pixels(self, image: Image.Image) -> tuple[torch.Tensor, PositionMap]: ...
    def frame_map(self) -> PositionMap: ...
    def prompt(self, question: str, kind: str) -> Prompt: ...


class LlavaParts:
    """Where every LLaVA-style checkpoint in transformers keeps its parts (``model.model.*``, ``lm_head``),
    and how it is loaded: the part the family adapters share."""

    model_class: str = ""  # the transformers class that loads the whole checkpoint

    def __init__(self, model_id: str, model: torch.nn.Module, tokenizer: Any, image_processor: Any,
                 revision: str | None = None):
        self.model_id = model_id
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.revision = revision

    @classmethod
    def load(cls, model_id: str, device: torch.device, dtype: torch.dtype, revision: str | None = None):
        import transformers
        from transformers import AutoTokenizer
        # From its module: transformers 5.17 exports AutoImageProcessor as a stub that demands torchvision.
        from transformers.models.auto.image_processing_auto import AutoImageProcessor

        model = load_pretrained(getattr(transformers, cls.model_class), model_id, revision, dtype=dtype)
        tokenizer = load_pretrained(AutoTokenizer, model_id, revision)
        image_processor = load_pretrained(AutoImageProcessor, model_id, revision)
        return cls(model_id, model.to(device).eval(), tokenizer, image_processor, revision)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def feature_layer(self) -> int:
        return self.config.vision_feature_layer

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, or a DymuError if it is malformed or this machine does not have it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DymuError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DymuError(f"device {str(device)!r} asked for, but this machine has no CUDA GPU that torch "
                            f"{torch.__version__} can use; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= count:
            raise DymuError(f"device {str(device)!r} asked for, but this machine has {count} CUDA GPU(s) "
                            f"(cuda:0 to cuda:{count - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DymuError(f"device {str(device)!r} asked for, but this machine has no MPS (Apple GPU) backend")
    return dev


def resolve_device_dtype(device: str | None, dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """``auto`` picks CUDA with bf16 when there is a GPU and CPU with fp32 otherwise."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = check_device(device)
    if isinstance(dtype, torch.dtype):
        return dev, dtype
    if dtype in (None, "auto"):
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise DymuError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
    return dev, names[dtype]


def load_pretrained(cls: Any, model_id: str, revision: str | None = None, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with a clear message when the checkpoint is neither local nor reachable."""
    try:
        return cls.from_pretrained(model_id, revision=revision, **kwargs)
    except OSError as exc:
        if Path(model_id).exists():
            raise ModelNotAvailable(f"{model_id} is not a usable checkpoint folder: {exc}") from exc
        raise ModelNotAvailable(
            f"model {model_id!r} is not in the local Hugging Face cache and could not be downloaded "
            f"(offline?). Download it once with network access, or for an offline smoke run make a tiny "
            f"random-weight one: `dymu-video make-tiny-model ./tiny-ov` and pass `--model ./tiny-ov`."
        ) from exc


def read_config_file(model_id: str, filename: str, revision: str | None = None) -> str | None:
    """A file of the checkpoint (local folder or hub cache) as text, or None if it has none."""
    from transformers.utils import cached_file

    try:
        path = cached_file(model_id, filename, revision=revision, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    return Path(path).read_text() if path else None


def chat_template(model_id: str, tokenizer: Any, revision: str | None = None) -> str:
    """The checkpoint's multimodal chat template (the processor's, which knows image/video items)."""
    import json

    text = read_config_file(model_id, "chat_template.jinja", revision)
    if text:
        return text
    text = read_config_file(model_id, "chat_template.json", revision)
    if text:
        return json.loads(text)["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise ModelNotAvailable(f"{model_id} has no chat template")


def split_prompt(tokenizer: Any, template: str, question: str, kind: str, placeholder_id: int) -> Prompt:
    """Render the chat template with one visual item and split the ids at its placeholder token."""
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids.count(placeholder_id) != 1:
        raise DymuError(f"the chat template produced {ids.count(placeholder_id)} visual placeholders, expected 1")
    cut = ids.index(placeholder_id)
    return Prompt(before=ids[:cut], after=ids[cut + 1 :])


def normalize_frames(frames: np.ndarray, size: tuple[int, int], mean: list[float], std: list[float]) -> torch.Tensor:
    """Resize (bicubic) and normalise uint8 frames (T, H, W, 3) into (T, 3, h, w) float32 pixels."""
    height, width = size
    resized = [
        np.asarray(Image.fromarray(frame).convert("RGB").resize((width, height), Image.Resampling.BICUBIC))
        for frame in frames
    ]
    pixels = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255.0
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t
