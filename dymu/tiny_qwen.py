"""Tiny random-weight Qwen2.5-VL and Qwen3-VL checkpoints (the parts `dymu.tiny.make_tiny_checkpoint` saves).

The geometry is the real one, the widths are tiny:

- Qwen2.5-VL: 14 px patches, two frames per temporal slot, 2x2 spatial merge, 112 px attention windows
  (8x8 patches) with full attention in the last of 4 blocks (the real model: every 8th of 32), Qwen2 decoder
  with M-RoPE sections in the real 16:24:24 ratio.
- Qwen3-VL: 16 px patches, a learned 48x48 position table, DeepStack mergers after ViT blocks 1 and 2 (the
  real model: 8, 16, 24 of 27), Qwen3 decoder (q/k norms) with interleaved M-RoPE in the real 24:20:20 ratio.

Processors are the model's own classes with the hub checkpoints' settings (pixel budgets, fps sampling
limits, normalisation), so that what they do to frames is what the real model gets.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dymu.tiny import TinySizes

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The hub chat templates' output format, written out short: Qwen2.5-VL adds a default system turn, Qwen3-VL
# does not. Each image / video item becomes <|vision_start|><|image_pad|>/<|video_pad|><|vision_end|>; the
# processor expands the pad to one token per merged 2x2 cell (Qwen3-VL: per temporal slot, with its time).
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
)
_QWEN25_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n" + _CONTENT + "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n" + _CONTENT + "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _qwen_tokenizer(sizes: TinySizes):
    from dymu.tiny import _build_tokenizer

    return _build_tokenizer(QWEN_SPECIAL_TOKENS, sizes.vocab_size, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def qwen25_vl_parts(sizes: TinySizes):
    """Config, tokenizer, processor and chat template of a tiny Qwen2.5-VL."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _qwen_tokenizer(sizes)
    head_dim = sizes.text_width // sizes.text_heads
    # M-RoPE (t, h, w) sections of the rotary half, in the real 16:24:24 ratio (head_dim 128 there).
    half = head_dim // 2
    t_sec = half // 4
    mrope = [t_sec, (half - t_sec) // 2, half - t_sec - (half - t_sec) // 2]
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": sizes.vision_layers,
            "hidden_size": sizes.vision_width,
            "intermediate_size": sizes.vision_mlp or 2 * sizes.vision_width,
            "num_heads": sizes.vision_heads,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [sizes.vision_layers - 1],
            "out_hidden_size": sizes.text_width,
            "tokens_per_second": 2,
        },
        text_config={
            "hidden_size": sizes.text_width,
            "intermediate_size": sizes.text_mlp or 4 * sizes.text_width,
            "num_hidden_layers": sizes.text_layers,
            "num_attention_heads": sizes.text_heads,
            "num_key_value_heads": sizes.text_kv_heads,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope},
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None,
        },
        tie_word_embeddings=False,
        **_token_ids(tokenizer),
    )
    # The hub checkpoint's settings: images within [4, 16384] merged cells, videos [128, 768] per frame,
    # sampled at 2 fps with 4..768 frames (qwen-vl-utils' defaults).
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384},
        patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
    )
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28},
        patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
        fps=2.0, min_frames=4, max_frames=768, cap_pixels_per_frame=True,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=_QWEN25_CHAT_TEMPLATE,
    )
    return config, processor, _QWEN25_CHAT_TEMPLATE


def qwen3_vl_parts(sizes: TinySizes):
    """Config, tokenizer, processor and chat template of a tiny Qwen3-VL."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tokenizer = _qwen_tokenizer(sizes)
    # Qwen3 sets head_dim explicitly (128 on the hub); 32 here keeps the interleaved sections in the real
    # 24:20:20 ratio (6:5:5 of the rotary half 16).
    head_dim = 32
    half = head_dim // 2
    hw = (half * 20) // 64
    mrope = [half - 2 * hw, hw, hw]
    depth = sizes.vision_layers
    config = Qwen3VLConfig(
        vision_config={
            "depth": depth,
            "hidden_size": sizes.vision_width,
            "intermediate_size": sizes.vision_mlp or 2 * sizes.vision_width,
            "num_heads": sizes.vision_heads,
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": sizes.text_width,
            "num_position_embeddings": 2304,
            # The real model taps blocks 8, 16, 24 of 27: early-to-late intermediate features.
            "deepstack_visual_indexes": list(range(1, depth - 1)) if depth > 2 else [0],
        },
        text_config={
            "hidden_size": sizes.text_width,
            "intermediate_size": sizes.text_mlp or 4 * sizes.text_width,
            # one decoder layer more than DeepStack taps, so that a layer without DeepStack exists too
            "num_hidden_layers": max(sizes.text_layers, (depth - 2 if depth > 2 else 1) + 1),
            "num_attention_heads": sizes.text_heads,
            "num_key_value_heads": sizes.text_kv_heads,
            "head_dim": head_dim,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 262144,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": mrope,
                "mrope_interleaved": True,
            },
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None,
        },
        tie_word_embeddings=False,
        **_token_ids(tokenizer),
    )
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": 65536, "longest_edge": 16777216},
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": 4096, "longest_edge": 25165824},
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        fps=2, min_frames=4, max_frames=768, do_sample_frames=True, cap_pixels_per_frame=True,
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=_QWEN3_CHAT_TEMPLATE,
    )
    return config, processor, _QWEN3_CHAT_TEMPLATE
