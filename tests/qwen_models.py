"""Tiny random-weight Qwen2.5-VL / Qwen3-VL models built from transformers' config classes, and inputs for
them (prompt ids with visual placeholders, random patches), shared by the M-RoPE / VTU tests.

Token ids: 0..199 text, then the model's special ids below; widths are tiny, the geometry is the real one
(patch 14 / 16, 2x2 spatial merge, 2 frames per temporal slot).
"""
from __future__ import annotations

import torch

IMAGE_ID, VIDEO_ID, START_ID, END_ID = 251, 252, 253, 254
VOCAB = 256


def tiny_qwen_vl(family: str, seed: int = 0, layers: int = 3) -> torch.nn.Module:
    """A Qwen2.5-VL ("qwen2.5-vl") or Qwen3-VL ("qwen3-vl") model, 64 wide, random weights, no EOS."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    ids = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=START_ID,
               vision_end_token_id=END_ID)
    text = dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=VOCAB, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    if family == "qwen2.5-vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        model = Qwen2_5_VLForConditionalGeneration(config)
    elif family == "qwen3-vl":
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [4, 2, 2], "mrope_interleaved": True})
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
        model = Qwen3VLForConditionalGeneration(config)
    else:
        raise ValueError(family)
    return model.eval()


def random_patches(model: torch.nn.Module, grid_thw: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """Flattened patches (t*h*w, C * temporal_patch * patch * patch) as the processors lay them out."""
    vision = model.config.vision_config
    width = 3 * vision.temporal_patch_size * vision.patch_size**2
    generator = torch.Generator().manual_seed(seed)
    t, h, w = grid_thw
    return torch.randn(t * h * w, width, generator=generator)


def placeholder_ids(before: int, count: int, after: int, token: int, seed: int = 0) -> torch.Tensor:
    """text ids, <vision_start>, ``count`` placeholders, <vision_end>, text ids (1-D)."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 200, (before + after,), generator=generator)
    return torch.cat([text[:before], torch.tensor([START_ID]), torch.full((count,), token), torch.tensor([END_ID]),
                      text[before:]])
