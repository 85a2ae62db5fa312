"""Qwen2.5-VL and Qwen3-VL: the model's own processor makes the pixels, grids and prompt; M-RoPE positions
come from the model's own ``get_rope_index``.

Unlike the LLaVA families there is no fixed encoder-to-LLM layout to probe: the processor picks each image's
or video's resolution (sides rounded to patch x merge within its pixel budget), the vision model's merger
turns each 2x2 group of patches into one LLM token, in temporal-slot then row-major order, and the prompt
holds one placeholder token per merger output (Qwen3-VL: a text timestamp and its own block per temporal
slot). So the visual block of the LLM is the merger output itself, and a ``MergedTokens`` over it (from
``dymu.vision.qwen_vl`` or the stock features) maps one-to-one onto the prompt's placeholders.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from dymu.errors import DymuError
from dymu.families.base import load_pretrained

if TYPE_CHECKING:  # torch is imported where it is used, so that the CLI's checks stay light
    import torch

    from dymu.llm.sequence import VirtualSequence
    from dymu.tokens import MergedTokens

log = logging.getLogger(__name__)


class QwenVLFamily:
    """Shared by both Qwen-VL generations; subclasses name the transformers class."""

    name = ""
    model_class = ""
    supports_video = True
    newline = None

    def __init__(self, model_id: str, model: torch.nn.Module, processor: Any, revision: str | None = None):
        self.model_id = model_id
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.revision = revision
        if not getattr(processor, "chat_template", None):
            raise DymuError(f"{model_id} has no chat template")

    @classmethod
    def load(cls, model_id: str, device: torch.device, dtype: torch.dtype, revision: str | None = None):
        import transformers
        from transformers import AutoProcessor

        model = load_pretrained(getattr(transformers, cls.model_class), model_id, revision, dtype=dtype)
        processor = load_pretrained(AutoProcessor, model_id, revision)
        return cls(model_id, model.to(device).eval(), processor, revision)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.visual

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    # --- pixels, by the model's own processors ----------------------------------------------------------
    def image_inputs(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """``pixel_values`` (patches, C*2*p*p) and ``image_grid_thw`` (1, 3) as the processor makes them."""
        out = self.processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def video_inputs(self, frames: np.ndarray, video_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """``pixel_values_videos``, ``video_grid_thw`` and the ``video_metadata`` of already sampled frames.

        ``video_metadata`` ({total_num_frames, fps, frames_indices}) says where the frames were taken, which
        sets Qwen2.5-VL's seconds per temporal slot and Qwen3-VL's timestamps; without it the frames are
        taken as 1 s apart. A single frame is repeated into a temporal slot (``processor_frames``).
        """
        from transformers.video_utils import VideoMetadata

        from dymu.vision.qwen_inputs import processor_frames

        if frames.ndim != 4 or frames.shape[0] == 0:
            raise DymuError(f"expected frames shaped (T, H, W, 3), got {frames.shape}")
        # The metadata stays the sampled frames' own: the processors repeat an odd last index as they need.
        metadata = VideoMetadata(**(video_metadata or default_metadata(len(frames))))
        video = processor_frames(frames, self.processor.video_processor.temporal_patch_size)
        out = self.processor.video_processor(videos=[video], video_metadata=[metadata], do_sample_frames=False,
                                             return_metadata=True, return_tensors="pt")
        return {"pixel_values_videos": out["pixel_values_videos"], "video_grid_thw": out["video_grid_thw"],
                "video_metadata": out["video_metadata"][0]}

    def seconds_per_slot(self, metadata: Any) -> float:
        """Seconds one temporal slot spans (Qwen2.5-VL's ``second_per_grid_ts``), as its processor computes it."""
        return self.processor.video_processor.temporal_patch_size / metadata.sampled_fps

    def video_seconds_per_slot(self, tokens: MergedTokens) -> float:
        """``tokens``' seconds per slot: as encoded, else from their ``video_metadata`` (a live feed's window),
        else 1.0."""
        from transformers.video_utils import VideoMetadata

        if tokens.meta.get("seconds_per_slot"):
            return float(tokens.meta["seconds_per_slot"])
        metadata = tokens.meta.get("video_metadata")
        return self.seconds_per_slot(VideoMetadata(**metadata)) if metadata else 1.0

    # --- the prompt -----------------------------------------------------------------------------------
    def prompt_ids(self, question: str, kind: str, tokens: MergedTokens) -> torch.Tensor:
        """The chat prompt's ids with the visual placeholder expanded as the processor expands it for
        ``tokens``' grid (one id per merger output; Qwen3-VL video: a timestamp and a block per slot)."""
        import torch

        placeholder = self.processor.video_token if kind == "video" else self.processor.image_token
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if text.count(placeholder) != 1:
            raise DymuError(f"the chat template produced {text.count(placeholder)} visual placeholders, expected 1")
        grid = torch.tensor([tokens.meta["grid_thw"]])
        if kind == "video":
            from transformers.video_utils import VideoMetadata

            metadata = VideoMetadata(**tokens.meta.get("video_metadata") or default_metadata(2 * int(grid[0, 0])))
            expanded = self.processor.replace_video_token({"video_grid_thw": grid, "video_metadata": [metadata]}, 0)
        else:
            expanded = self.processor.replace_image_token({"image_grid_thw": grid}, 0)
        text = expand_placeholder(self.processor, text, placeholder, expanded, kind)
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def question_sequence(self, tokens: MergedTokens, question: str, kind: str) -> VirtualSequence:
        """The LLM input: prompt ids, the merged rows at the placeholders, every position's stock (t, h, w)."""
        import torch

        from dymu.llm.mrope import sequence_from_ids, stock_positions

        ids = self.prompt_ids(question, kind, tokens)
        grid = torch.tensor([tokens.meta["grid_thw"]])
        if kind == "video":
            positions = stock_positions(self.model, ids, video_grid_thw=grid,
                                        second_per_grid_ts=[self.video_seconds_per_slot(tokens)])
        else:
            positions = stock_positions(self.model, ids, image_grid_thw=grid)
        return sequence_from_ids(self.model, ids, tokens, positions, tokens.deepstack or None)


def expand_placeholder(processor: Any, text: str, placeholder: str, expanded: str, kind: str) -> str:
    """``text`` with its one visual placeholder replaced by ``expanded``, by the processor's own rule where it
    has one: since transformers 5.25 Qwen3-VL's drops the chat template's outer <|vision_start|>...<|vision_end|>
    around a video (each frame is wrapped already), and earlier releases replace the bare placeholder. Asking
    the processor keeps ``off`` equal to the stock pipeline whichever rule the installed release follows."""
    replace = getattr(processor, "get_text_with_replacements", None)
    if replace is None:  # transformers < 5.2x: the processor's __call__ replaces the placeholder in place
        return text.replace(placeholder, expanded)
    replacements = {"images_replacements": [expanded]} if kind == "image" else {"videos_replacements": [expanded]}
    texts, _ = replace([text], **replacements)
    return texts[0]


def default_metadata(num_frames: int) -> dict[str, Any]:
    return {"total_num_frames": num_frames, "fps": 1.0, "frames_indices": list(range(num_frames))}


class Qwen25VLFamily(QwenVLFamily):
    name = "qwen2.5-vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"


class Qwen3VLFamily(QwenVLFamily):
    name = "qwen3-vl"
    model_class = "Qwen3VLForConditionalGeneration"
