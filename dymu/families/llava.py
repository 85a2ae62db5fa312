"""LLaVA-1.5 (CLIP ViT-L/14-336 encoder + Llama LLM): one image, CLS dropped, 576 positions."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dymu.errors import DymuError
from dymu.families.base import Prompt, chat_template, load_pretrained, split_prompt
from dymu.layout import PositionMap, identity_map


class LlavaFamily:
    name = "llava"
    supports_video = False

    def __init__(self, model_id: str, model: torch.nn.Module, tokenizer, image_processor, revision: str | None = None):
        self.model_id = model_id
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self._template = chat_template(model_id, tokenizer, revision)
        if model.config.vision_feature_select_strategy != "default":
            raise DymuError("only LLaVA checkpoints that drop CLS (vision_feature_select_strategy='default') are supported")

    @classmethod
    def load(cls, model_id: str, device: torch.device, dtype: torch.dtype, revision: str | None = None) -> "LlavaFamily":
        from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

        model = load_pretrained(LlavaForConditionalGeneration, model_id, revision, dtype=dtype)
        tokenizer = load_pretrained(AutoTokenizer, model_id, revision)
        image_processor = load_pretrained(AutoImageProcessor, model_id, revision)
        return cls(model_id, model.to(device).eval(), tokenizer, image_processor, revision)

    @property
    def config(self):
        return self.model.config

    @property
    def num_patches(self) -> int:
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

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

    @property
    def newline(self) -> None:
        return None

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def frame_pixels(self, frames: np.ndarray) -> torch.Tensor:
        raise DymuError("LLaVA-1.5 answers about images only; use a LLaVA-OneVision model for video")

    def image_pixels(self, image: Image.Image) -> tuple[torch.Tensor, PositionMap]:
        pixels = self.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
        return pixels, identity_map(self.num_patches)

    def frame_map(self) -> PositionMap:
        raise DymuError("LLaVA-1.5 answers about images only; use a LLaVA-OneVision model for video")

    def prompt(self, question: str, kind: str) -> Prompt:
        return split_prompt(self.tokenizer, self._template, question, "image", self.config.image_token_index)
