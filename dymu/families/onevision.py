"""LLaVA-OneVision (SigLIP encoder + Qwen2 LLM): images (AnyRes) and video (frames pooled to 14x14)."""
from __future__ import annotations

import json
import logging
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from dymu.families.base import (
    LlavaParts,
    Prompt,
    chat_template,
    normalize_frames,
    read_config_file,
    split_prompt,
)
from dymu.layout import PositionMap, probe_position_map

log = logging.getLogger(__name__)


class OneVisionFamily(LlavaParts):
    name = "llava-onevision"
    supports_video = True
    model_class = "LlavaOnevisionForConditionalGeneration"

    def __init__(self, model_id: str, model: torch.nn.Module, tokenizer, image_processor, revision: str | None = None):
        super().__init__(model_id, model, tokenizer, image_processor, revision)
        self._template = chat_template(model_id, tokenizer, revision)
        video_cfg = json.loads(read_config_file(model_id, "video_preprocessor_config.json", revision) or "{}")
        size = video_cfg.get("size") or {"height": self.image_size, "width": self.image_size}
        self._video_size = (int(size["height"]), int(size["width"]))
        self._video_mean = list(video_cfg.get("image_mean") or image_processor.image_mean)
        self._video_std = list(video_cfg.get("image_std") or image_processor.image_std)

    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size

    @property
    def grid(self) -> int:
        return self.image_size // self.config.vision_config.patch_size

    @property
    def newline(self) -> torch.Tensor:
        return self.model.model.image_newline

    def frame_pixels(self, frames: np.ndarray) -> torch.Tensor:
        """Video frames as the model's video processor prepares them: a square resize and normalisation."""
        return normalize_frames(frames, self._video_size, self._video_mean, self._video_std)

    def image_pixels(self, image: Image.Image) -> tuple[torch.Tensor, PositionMap]:
        """AnyRes crops (base image first) and the map that packs their patches as the model does."""
        out = self.image_processor(image.convert("RGB"), return_tensors="pt")
        pixels = out["pixel_values"][0]  # (crops, 3, H, W)
        height, width = (int(v) for v in out["image_sizes"][0])
        return pixels, self._image_map(pixels.shape[0], height, width)

    def frame_map(self) -> PositionMap:
        """One video frame's map: its 27x27 grid pooled to 14x14 (the newline comes once, after all frames)."""
        return self._frame_map()

    def prompt(self, question: str, kind: str) -> Prompt:
        token_id = self.config.video_token_index if kind == "video" else self.config.image_token_index
        return split_prompt(self.tokenizer, self._template, question, kind, token_id)

    @lru_cache(maxsize=1)
    def _frame_map(self) -> PositionMap:
        per_frame = self.grid * self.grid
        with torch.no_grad():
            return probe_position_map(lambda x: self.model.model.apply_pooling(x.view(1, per_frame, -1))[0], per_frame)

    @lru_cache(maxsize=16)
    def _image_map(self, crops: int, height: int, width: int) -> PositionMap:
        per_crop = self.grid * self.grid
        sizes = torch.tensor([[height, width]])

        def pack(probe: torch.Tensor) -> torch.Tensor:
            nan_newline = torch.full((probe.shape[1],), float("nan"))
            packed, _ = self.model.model.pack_image_features(
                [probe.view(crops, per_crop, -1)], sizes, image_newline=nan_newline,
                vision_aspect_ratio=self.config.vision_aspect_ratio,
            )
            return packed[0]

        with torch.no_grad():
            return probe_position_map(pack, crops * per_crop)
