"""DToMe on a Hugging Face vision tower: pick the family adapter and run up to the feature layer."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dymu.checkpoint import TOWER_FAMILIES, layers_to_run
from dymu.errors import DymuError
from dymu.merge import MERGE_ORDERS
from dymu.vision.clip import clip_parts
from dymu.vision.runner import EncoderParts, MergedImage, MergePolicy, ThresholdPolicy, run_layers, split_images
from dymu.vision.siglip import siglip_parts

# config.model_type of the tower -> (family name, adapter)
_PARTS = {"siglip": siglip_parts, "clip": clip_parts}
_ADAPTERS = {model_type: (family, _PARTS[family]) for model_type, family in TOWER_FAMILIES.items()}


def vision_family(tower: nn.Module) -> str:
    """``siglip`` or ``clip``; a DymuError for any other tower."""
    model_type = getattr(getattr(tower, "config", None), "model_type", None)
    if model_type not in _ADAPTERS:
        raise DymuError(f"no DToMe adapter for a {model_type!r} vision tower; supported: SigLIP and CLIP")
    return _ADAPTERS[model_type][0]


def encoder_parts(tower: nn.Module) -> EncoderParts:
    vision_family(tower)
    return _ADAPTERS[tower.config.model_type][1](tower)


class DToMeEncoder:
    """A vision tower run with DToMe, up to its feature layer, with the tower's own weights.

    ``taus``: one threshold per layer run (``None``: all 1.0, i.e. the stock features). ``drop_cls``: leave
    CLIP's CLS token out of the result (LLaVA's "default" feature strategy). ``merge_order``: how rows are
    arranged after each merge, which decides the next layer's A/B split: "positional" (default) or
    "authors" (DyMU's own code; see ``dymu.merge``).
    """

    def __init__(
        self,
        tower: nn.Module,
        taus: Sequence[float] | None = None,
        feature_layer: int = -1,
        drop_cls: bool = False,
        merge_order: str = "positional",
    ):
        self.tower = tower
        self.family = vision_family(tower)
        self.parts = encoder_parts(tower)
        self.num_layers = layers_to_run(feature_layer, len(self.parts.layers))
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls and self.parts.num_protected > 0
        if merge_order not in MERGE_ORDERS:
            raise DymuError(f"unknown merge order {merge_order!r}; choose one of {', '.join(MERGE_ORDERS)}")
        self.merge_order = merge_order
        self.taus = [1.0] * self.num_layers if taus is None else [float(t) for t in taus]
        if len(self.taus) != self.num_layers:
            raise DymuError(f"{len(self.taus)} thresholds given for {self.num_layers} encoder layers")

    @property
    def image_size(self) -> int:
        return int(self.tower.config.image_size)

    @property
    def num_positions(self) -> int:
        """Positions per image in the results: the patches, plus CLS when it is kept."""
        grid = self.tower.config.image_size // self.tower.config.patch_size
        return grid * grid + self.parts.num_protected - (1 if self.drop_cls else 0)

    def __call__(self, pixel_values: Tensor) -> list[MergedImage]:
        """Merged features of a batch of images (B, 3, H, W), each with as many tokens as its content needs."""
        return self.run(pixel_values, ThresholdPolicy(self.taus))

    @torch.no_grad()
    def run(self, pixel_values: Tensor, policy: MergePolicy) -> list[MergedImage]:
        """As ``__call__`` but with any merge policy (calibration uses the batch's top edges)."""
        weight = next(self.tower.parameters())
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        state = run_layers(self.parts, pixel_values, self.num_layers, policy, self.merge_order)
        return split_images(state, drop_first=self.drop_cls)
