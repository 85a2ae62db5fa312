"""A Qwen2.5-VL / Qwen3-VL checkpoint's vision side for `calibrate` and `tokens`: the encoder, its
processor, and the frame-by-frame interface those commands use (``DToMeEncoder``'s).

Each image or sampled video frame counts as one still image (one temporal slot). `tokens` runs it at the
processor's dynamic resolution, so the counts are the ones the model pays. Calibration runs every sample
at one reference size (448 x 448: 256 merger cells on Qwen2.5-VL, 196 on Qwen3-VL), so that a batch shares
one grid and a preset's share of tokens means the same on every sample; thresholds are cosines and carry
over to other resolutions.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dymu.errors import DymuError
from dymu.vision.qwen_inputs import QwenVisualInput, image_inputs
from dymu.vision.qwen_vl import QwenDToMeEncoder
from dymu.vision.runner import MergedImage, MergePolicy, ThresholdPolicy

log = logging.getLogger(__name__)

CALIBRATION_SIDE = 448
QWEN_MODEL_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}


class QwenFrameEncoder:
    """``QwenDToMeEncoder`` behind the interface of ``DToMeEncoder``: one result per input image."""

    feature_layer = -1
    # Qwen's merges stay inside attention windows and 2x2 merger groups, in positional order only.
    merge_order = "positional"

    def __init__(self, visual: nn.Module, taus: Sequence[float] | None = None, grouping: str = "group",
                 rotary: str = "mean"):
        self.qwen = QwenDToMeEncoder(visual, taus=taus, grouping=grouping, rotary=rotary)
        self.visual = visual
        # Thresholds calibrated on whole 2x2 groups do not fit single patches: the fingerprint says which.
        self.family = self.qwen.family if grouping == "group" else f"{self.qwen.family}/{grouping}"
        self.num_layers = self.qwen.num_layers
        self.taus = self.qwen.taus

    @property
    def image_size(self) -> int:
        return CALIBRATION_SIDE

    @property
    def num_positions(self) -> int:
        """Merge positions of a calibration-size image: its merger cells (``grouping="patch"``: its patches,
        so that a preset removes the same share of the encoder's rows either way)."""
        config = self.visual.config
        cells = (CALIBRATION_SIDE // (config.patch_size * config.spatial_merge_size)) ** 2
        return cells if self.qwen.grouping == "group" else cells * config.spatial_merge_size**2

    def __call__(self, inputs: QwenVisualInput) -> list[MergedImage]:
        return self.run(inputs, ThresholdPolicy(self.taus))

    def run(self, inputs: QwenVisualInput, policy: MergePolicy) -> list[MergedImage]:
        tokens = self.qwen.run(inputs.pixel_values, inputs.grid_thw, policy)
        return [MergedImage(features=t.embeds, sizes=t.sizes, mapping=t.mapping) for t in tokens]

    def fingerprint(self):
        from dymu.thresholds import EncoderFingerprint

        config = self.visual.config
        return EncoderFingerprint(family=self.family, num_layers=self.num_layers, feature_layer=-1,
                                  image_size=CALIBRATION_SIDE, patch_size=int(config.patch_size),
                                  hidden_size=int(config.hidden_size))


@dataclass
class QwenVisionModel:
    """A Qwen-VL checkpoint's vision model and processor (the language model is dropped at load)."""

    model_id: str
    visual: nn.Module
    processor: Any
    grouping: str = "group"
    rotary: str = "mean"

    def encoder(self, taus: Sequence[float] | None = None, merge_order: str = "positional") -> QwenFrameEncoder:
        if merge_order != QwenFrameEncoder.merge_order:
            raise DymuError(f"merge order {merge_order!r} is not available on Qwen-VL encoders (their merges stay "
                            f"inside windows and 2x2 merger groups, in positional order)")
        return QwenFrameEncoder(self.visual, taus=taus, grouping=self.grouping, rotary=self.rotary)

    def pixels(self, frames: Sequence[np.ndarray | Image.Image]) -> QwenVisualInput:
        """Each frame as a still image at the processor's dynamic resolution."""
        return image_inputs(self.processor, frames)

    def calibration_pixels(self, frames: Sequence[np.ndarray | Image.Image]) -> QwenVisualInput:
        """Each frame resized to the calibration size first, so that a batch shares one grid."""
        side = (CALIBRATION_SIDE, CALIBRATION_SIDE)
        images = [(f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f))).convert("RGB")
                  .resize(side, Image.BICUBIC) for f in frames]
        return image_inputs(self.processor, images)


def load_qwen_vision_model(model_id: str, model_type: str, device: torch.device, dtype: torch.dtype,
                           grouping: str = "group", rotary: str = "mean") -> QwenVisionModel:
    """Load a Qwen2.5-VL / Qwen3-VL checkpoint through transformers and keep its vision model."""
    import transformers
    from transformers import AutoProcessor

    from dymu.families.base import load_pretrained

    if model_type not in QWEN_MODEL_CLASSES:
        raise DymuError(f"{model_id} is a {model_type!r} model, not Qwen2.5-VL or Qwen3-VL")
    model = load_pretrained(getattr(transformers, QWEN_MODEL_CLASSES[model_type]), model_id, dtype=dtype)
    processor = load_pretrained(AutoProcessor, model_id)
    visual = model.model.visual.to(device).eval()
    del model
    log.info("loaded the %s vision model of %s on %s (%s)", model_type, model_id, device, dtype)
    return QwenVisionModel(model_id, visual, processor, grouping, rotary)
