"""SigLIP (LLaVA-OneVision's encoder): no CLS token, so every patch may merge."""
from __future__ import annotations

from torch import nn

from dymu.vision.runner import EncoderParts


def siglip_parts(model: nn.Module) -> EncoderParts:
    """Parts of a ``SiglipVisionModel`` (or the ``SiglipVisionTransformer`` that older releases wrap)."""
    inner = getattr(model, "vision_model", model)
    return EncoderParts(embed=inner.embeddings, layers=inner.encoder.layers, num_protected=0)
