"""LLaVA-1.5 (CLIP ViT-L/14-336 encoder + Llama LLM): one image, CLS dropped, 576 positions."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dymu.errors import DymuError
from dymu.families.base import LlavaParts, Prompt, chat_template, split_prompt
from dymu.layout import PositionMap, identity_map


class LlavaFamily(LlavaParts):
    name = "llava"
    supports_video = False
    model_class = "LlavaForConditionalGeneration"

    def __init__(self, model_id: str, model: torch.nn.Module, tokenizer, image_processor, revision: str | None = None):
        super().__init__(model_id, model, tokenizer, image_processor, revision)
        self._template = chat_template(model_id, tokenizer, revision)
        if model.config.vision_feature_select_strategy != "default":
            raise DymuError("only LLaVA checkpoints that drop CLS (vision_feature_select_strategy='default') are supported")

    @property
    def num_patches(self) -> int:
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    @property
    def newline(self) -> None:
        return None

    def frame_pixels(self, frames: np.ndarray) -> torch.Tensor:
        raise DymuError("LLaVA-1.5 answers about images only; use a LLaVA-OneVision model for video")

    def image_pixels(self, image: Image.Image) -> tuple[torch.Tensor, PositionMap]:
        pixels = self.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
        return pixels, identity_map(self.num_patches)

    def frame_map(self) -> PositionMap:
        raise DymuError("LLaVA-1.5 answers about images only; use a LLaVA-OneVision model for video")

    def prompt(self, question: str, kind: str) -> Prompt:
        return split_prompt(self.tokenizer, self._template, question, "image", self.config.image_token_index)
