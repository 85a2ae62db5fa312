"""DToMe in Hugging Face vision towers (SigLIP, CLIP; Qwen2.5-VL and Qwen3-VL in ``qwen_vl``): the runner, one
adapter per family, model loading."""
from dymu.vision.encoder import DToMeEncoder, encoder_parts, layers_to_run, vision_family
from dymu.vision.qwen_vl import QwenDToMeEncoder
from dymu.vision.runner import EncoderParts, MergedImage, ThresholdPolicy, frames_to_tokens

__all__ = [
    "DToMeEncoder",
    "EncoderParts",
    "MergedImage",
    "QwenDToMeEncoder",
    "ThresholdPolicy",
    "encoder_parts",
    "frames_to_tokens",
    "layers_to_run",
    "vision_family",
]
