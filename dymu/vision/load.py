"""Loading a LLaVA checkpoint's vision tower for DToMe, and turning images and video frames into its input.

Pixels are prepared the way the checkpoint's video processor does for frames: a square resize to the
encoder's input size (no AnyRes crops) and normalisation with the checkpoint's own mean and std, so that an
image costs one encoder pass and its token count reads directly against the encoder's grid.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dymu.errors import DymuError
from dymu.families import FAMILIES
from dymu.families.base import load_pretrained, normalize_frames, resolve_device_dtype
from dymu.frames import MediaNotFound, load_image, media_kind, read_video_frames
from dymu.vision.encoder import DToMeEncoder
from dymu.vision.qwen_model import QWEN_MODEL_CLASSES, QwenVisionModel, load_qwen_vision_model

log = logging.getLogger(__name__)

# Files a directory given as data contributes (a file named explicitly is probed whatever its name).
_MEDIA_SUFFIXES = {
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".ts", ".mpg", ".mpeg", ".3gp", ".wmv",
}


@dataclass
class VisionModel:
    """A checkpoint's vision tower with what DToMe needs to know about how the LLM reads it."""

    model_id: str
    tower: nn.Module
    feature_layer: int
    drop_cls: bool
    image_mean: list[float]
    image_std: list[float]

    @property
    def image_size(self) -> int:
        return int(self.tower.config.image_size)

    def encoder(self, taus: Sequence[float] | None = None, merge_order: str = "positional") -> DToMeEncoder:
        return DToMeEncoder(self.tower, taus=taus, feature_layer=self.feature_layer, drop_cls=self.drop_cls,
                            merge_order=merge_order)

    def pixels(self, frames: Sequence[np.ndarray | Image.Image]) -> torch.Tensor:
        """(T, 3, S, S) float32 pixels of RGB images or uint8 (H, W, 3) frames of any size."""
        arrays = [np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame) for frame in frames]
        return normalize_frames(arrays, (self.image_size, self.image_size), self.image_mean, self.image_std)

    def calibration_pixels(self, frames: Sequence[np.ndarray | Image.Image]) -> torch.Tensor:
        """Calibration sees frames as the encoder does (every frame is square-resized already)."""
        return self.pixels(frames)


def vision_model_from(model_id: str, model: nn.Module, image_processor) -> VisionModel:
    """The vision side of an already loaded LLaVA / LLaVA-OneVision model."""
    config = model.config
    if not isinstance(config.vision_feature_layer, int):
        raise DymuError(f"{model_id} reads several vision layers {config.vision_feature_layer}; DToMe needs one")
    return VisionModel(
        model_id=model_id,
        tower=model.model.vision_tower,
        feature_layer=config.vision_feature_layer,
        drop_cls=config.vision_feature_select_strategy == "default",
        image_mean=list(image_processor.image_mean),
        image_std=list(image_processor.image_std),
    )


def load_vision_model(
    model_id: str, device: str | None = "auto", dtype: str | torch.dtype | None = "auto"
) -> VisionModel | QwenVisionModel:
    """Load a LLaVA-OneVision, LLaVA-1.5, Qwen2.5-VL or Qwen3-VL checkpoint (hub id or folder) and keep only
    its vision side.

    The whole checkpoint is loaded through transformers (which knows every weight naming scheme) and the
    language model is dropped at once.
    """
    import transformers
    from transformers import AutoConfig
    # From its module: transformers 5.17 exports AutoImageProcessor as a stub that demands torchvision.
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    device, dtype = resolve_device_dtype(device, dtype)
    try:
        config = load_pretrained(AutoConfig, model_id)
    except ValueError as exc:  # a folder with a config.json that is not a model's
        raise DymuError(f"{model_id} is not a Hugging Face model checkpoint ({exc})") from exc
    if config.model_type in QWEN_MODEL_CLASSES:
        return load_qwen_vision_model(model_id, config.model_type, device, dtype)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise DymuError(
            f"{model_id} is a {config.model_type!r} model; supported: LLaVA-OneVision, LLaVA-1.5, Qwen2.5-VL and Qwen3-VL"
        )
    model = load_pretrained(getattr(transformers, family.model_class), model_id, dtype=dtype)
    image_processor = load_pretrained(AutoImageProcessor, model_id)
    vision = vision_model_from(model_id, model, image_processor)
    del model
    vision.tower.to(device).eval()
    log.info("loaded the %s vision tower of %s on %s (%s)", vision.tower.config.model_type, model_id, device, dtype)
    return vision


@dataclass
class Sample:
    """One encoder input: a still image, or one sampled frame of a video."""

    path: Path
    frame: np.ndarray  # (H, W, 3) uint8 RGB
    index: int | None = None  # frame number among the sampled ones; None for a still image
    timestamp: float | None = None


def media_files(paths: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """Each file with its kind (``image`` or ``video``); a directory gives its media files, sorted.

    A missing path or a file that is neither an image nor a video raises the ``MediaError`` that says so.
    """
    files: list[tuple[Path, str]] = []
    for path in map(Path, paths):
        if path.is_dir():
            members = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _MEDIA_SUFFIXES)
            files.extend((member, media_kind(member)) for member in members)
        elif path.exists():
            files.append((path, media_kind(path)))
        else:
            raise MediaNotFound(f"{path}: no such file or directory")
    return files


def iter_samples(files: Iterable[tuple[Path, str]], frames_per_video: int) -> Iterator[Sample]:
    """Decode files one by one: an image gives one sample, a video ``frames_per_video`` sampled frames."""
    for path, kind in files:
        if kind == "image":
            yield Sample(path=path, frame=np.asarray(load_image(path)))
            continue
        video = read_video_frames(path, num_frames=frames_per_video)
        for index, (frame, timestamp) in enumerate(zip(video.frames, video.timestamps)):
            yield Sample(path=path, frame=frame, index=index, timestamp=float(timestamp))


def batched(samples: Iterable[Sample], batch_size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
