"""CLIP (LLaVA-1.5's encoder): a CLS token in front, never merged, and a layer norm before the first layer."""
from __future__ import annotations

from torch import Tensor, nn

from dymu.vision.runner import EncoderParts


def clip_parts(model: nn.Module) -> EncoderParts:
    """Parts of a ``CLIPVisionModel`` (or the ``CLIPVisionTransformer`` that older releases wrap)."""
    inner = getattr(model, "vision_model", model)

    def embed(pixel_values: Tensor) -> Tensor:
        return inner.pre_layrnorm(inner.embeddings(pixel_values))

    return EncoderParts(embed=embed, layers=inner.encoder.layers, num_protected=1)
