"""Tiny random-weight checkpoints, for tests and offline smoke runs.

`make_tiny_checkpoint` writes a complete Hugging Face folder (config, safetensors weights, a tokenizer built
here from a few sentences, image/video processor configs and a chat template) that transformers' own
``from_pretrained`` loads like any downloaded checkpoint. The image geometry is the real one (SigLIP
384 px / patch 14 = 729 patches; CLIP 336 px / patch 14 = 576 patches + CLS) so that token counts mean what
they mean on real models; widths and depths are shrunk so that a forward pass takes milliseconds.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FAMILIES = ("llava-onevision", "llava", "qwen2.5-vl", "qwen3-vl")

# A few sentences are enough for a tiny BPE: any ASCII text still tokenizes (characters are the
# alphabet), common words just come out shorter.
_CORPUS = [
    "What is the person doing in the video? Describe the scene in detail.",
    "A man is walking a dog along the street while cars pass by.",
    "The camera shows a static view of a door, a wall and a window.",
    "Is anyone at the door? Describe what changed since the last frame.",
    "A cat sits on a red sofa next to a lamp and a green plant.",
    "The quick brown fox jumps over the lazy dog, then runs into the forest.",
    "Summarize the video: people, objects, actions, colours and the setting.",
]

_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class TinySizes:
    """Widths and depths of a tiny checkpoint. The defaults keep a whole forward pass in milliseconds."""

    vision_width: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    vocab_size: int = 512
    vision_mlp: int | None = None  # MLP widths; None = 4x the model width
    text_mlp: int | None = None


def _build_tokenizer(special_tokens: list[str], vocab_size: int, **named_special: str):
    """A sentencepiece-style BPE over printable ASCII: any token decodes to readable text, so even a
    random-weight model's answer prints as (random) words; other characters become the unknown token."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    unk = named_special.get("unk_token", special_tokens[0])
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=list(string.printable.strip()) + ["\u2581"],
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named_special)


def _ov_parts(sizes: TinySizes):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil, Qwen2Config, SiglipVisionConfig

    tokenizer = _build_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        sizes.vocab_size,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    vocab = len(tokenizer)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=sizes.vision_width,
            intermediate_size=sizes.vision_mlp or 4 * sizes.vision_width,
            num_hidden_layers=sizes.vision_layers,
            num_attention_heads=sizes.vision_heads,
            image_size=384,
            patch_size=14,
            vision_use_head=False,
        ).to_dict(),
        text_config=Qwen2Config(
            hidden_size=sizes.text_width,
            intermediate_size=sizes.text_mlp or 4 * sizes.text_width,
            num_hidden_layers=sizes.text_layers,
            num_attention_heads=sizes.text_heads,
            num_key_value_heads=sizes.text_kv_heads,
            vocab_size=vocab,
            max_position_embeddings=32768,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        ).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    image_processor = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return config, tokenizer, image_processor, _OV_CHAT_TEMPLATE


def _llava_parts(sizes: TinySizes):
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig

    tokenizer = _build_tokenizer(
        ["<unk>", "<s>", "</s>", "<image>", "<pad>"],
        sizes.vocab_size,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    vocab = len(tokenizer)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=sizes.vision_width,
            intermediate_size=sizes.vision_mlp or 4 * sizes.vision_width,
            num_hidden_layers=sizes.vision_layers,
            num_attention_heads=sizes.vision_heads,
            projection_dim=sizes.vision_width,
            image_size=336,
            patch_size=14,
        ).to_dict(),
        text_config=LlamaConfig(
            hidden_size=sizes.text_width,
            intermediate_size=sizes.text_mlp or 4 * sizes.text_width,
            num_hidden_layers=sizes.text_layers,
            num_attention_heads=sizes.text_heads,
            num_key_value_heads=sizes.text_kv_heads,
            vocab_size=vocab,
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        ).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    return config, tokenizer, image_processor, _LLAVA_CHAT_TEMPLATE


def make_tiny_checkpoint(
    out_dir: str | Path,
    family: str = "llava-onevision",
    seed: int = 0,
    sizes: TinySizes | None = None,
    init_device: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a tiny random-weight checkpoint of ``family`` into ``out_dir`` and return its path.

    The same seed gives the same weights and tokenizer. The folder holds what a hub checkpoint holds, so
    every loader in this package (and transformers' own) treats it as a real model. ``init_device`` (e.g.
    "cuda") draws the weights there, and ``dtype`` saves them in that dtype: for full-size shapes on a GPU,
    where drawing billions of weights on the CPU takes a minute (other weights than the CPU's, same seed).
    """
    if family not in FAMILIES:
        from dymu.errors import DymuError

        raise DymuError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    sizes = sizes or TinySizes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family in ("qwen2.5-vl", "qwen3-vl"):
        _save_qwen(out, family, seed, sizes, init_device, dtype)
        log.info("wrote tiny %s checkpoint to %s", family, out)
        return out

    from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    if family == "llava-onevision":
        config, tokenizer, image_processor, chat_template = _ov_parts(sizes)
        model_cls = LlavaOnevisionForConditionalGeneration
    else:
        config, tokenizer, image_processor, chat_template = _llava_parts(sizes)
        model_cls = LlavaForConditionalGeneration

    model = _random_model(model_cls, config, seed, init_device, dtype)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(chat_template)
    _write_processor_configs(out, family, config, image_processor)
    log.info("wrote tiny %s checkpoint to %s", family, out)
    return out


def _random_model(model_cls, config, seed: int, init_device: str | None, dtype: torch.dtype | None):
    torch.manual_seed(seed)
    try:
        with torch.device(init_device or "cpu"):
            model = model_cls(config).eval()
    except Exception as exc:  # noqa: BLE001 - a model class that cannot be built there: the CPU always works
        if init_device in (None, "cpu"):
            raise
        log.warning("could not draw the weights on %s (%s: %s); drawing them on the CPU", init_device,
                    type(exc).__name__, exc)
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    return model.to(dtype) if dtype is not None else model


def _save_qwen(out: Path, family: str, seed: int, sizes: TinySizes, init_device: str | None = None,
               dtype: torch.dtype | None = None) -> None:
    """Qwen-VL checkpoints are saved through their own processor class (it writes the tokenizer, the image
    and video processor configs and the chat template), so AutoProcessor loads them back as they are."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    from dymu.tiny_qwen import qwen3_vl_parts, qwen25_vl_parts

    if family == "qwen2.5-vl":
        config, processor, _ = qwen25_vl_parts(sizes)
        model_cls = Qwen2_5_VLForConditionalGeneration
    else:
        config, processor, _ = qwen3_vl_parts(sizes)
        model_cls = Qwen3VLForConditionalGeneration
    model = _random_model(model_cls, config, seed, init_device, dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=processor.tokenizer.eos_token_id, pad_token_id=processor.tokenizer.pad_token_id
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _write_processor_configs(out: Path, family: str, config, image_processor) -> None:
    """Write the processor files a hub checkpoint carries.

    They are written as JSON rather than through the processor classes because LLaVA-OneVision's video
    processor needs torchvision, which CPU-only machines may lack; the files are the same either way.
    """
    if family == "llava-onevision":
        processor = {
            "processor_class": "LlavaOnevisionProcessor",
            "num_image_tokens": (config.vision_config.image_size // config.vision_config.patch_size) ** 2,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "vision_aspect_ratio": config.vision_aspect_ratio,
        }
        video = {
            "video_processor_type": "LlavaOnevisionVideoProcessor",
            "processor_class": "LlavaOnevisionProcessor",
            "size": {"height": 384, "width": 384},
            "resample": 3,
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(image_processor.image_mean),
            "image_std": list(image_processor.image_std),
            "do_convert_rgb": True,
        }
        (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    else:
        processor = {
            "processor_class": "LlavaProcessor",
            "patch_size": config.vision_config.patch_size,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "num_additional_image_tokens": 1,
        }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
