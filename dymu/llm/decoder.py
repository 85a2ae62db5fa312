"""The decoder LLM as the VTU / pruning loop sees it: the Hugging Face model's own modules, plus the
row-wise pieces of one decoder layer written as small functions over (rows, features) tensors.

Everything here acts on unbatched tensors: hidden states are (n, D), queries (n, Hq, hd), keys and values
(n, Hkv, hd). Norms, projections and the MLP act row by row, which is what makes VTU exact for them: they
run once per unique row, however many positions that row stands for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dymu.errors import DymuError


@dataclass
class Decoder:
    """Handles on a decoder-only LLM's modules (not copies): the loop runs on the HF weights.

    Each of ``layers`` has ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm`` and
    ``mlp`` (the Llama / Qwen2 layout; Qwen3 layers add ``self_attn.{q,k}_norm`` over each head's features,
    applied before RoPE). ``rotary_emb(x, position_ids)`` returns (cos, sin), already scaled by
    the RoPE type's ``attention_scaling``.
    """

    embed_tokens: nn.Module
    layers: list[nn.Module]
    norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    eos_token_ids: tuple[int, ...]
    mrope: bool = False  # rotary_emb takes (3, batch, n) M-RoPE (t, h, w) positions (Qwen2.5-VL, Qwen3-VL)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def from_hf(cls, language_model: nn.Module, lm_head: nn.Module, eos_token_ids: tuple[int, ...]) -> "Decoder":
        """Collect the modules of a HF ``LlamaModel``-layout decoder (``Qwen2Model``, ``LlamaModel``...)."""
        config = language_model.config
        attn = language_model.layers[0].self_attn
        return cls(
            embed_tokens=language_model.embed_tokens,
            layers=list(language_model.layers[: config.num_hidden_layers]),
            norm=language_model.norm,
            rotary_emb=language_model.rotary_emb,
            lm_head=lm_head,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=attn.head_dim,
            max_positions=config.max_position_embeddings,
            eos_token_ids=eos_token_ids,
        )


def load_decoder(model: nn.Module | Decoder) -> Decoder:
    """Find the decoder LLM inside a HF model: ``XForCausalLM`` (``model.model``) or a VLM such as
    ``LlavaOnevisionForConditionalGeneration`` (``model.model.language_model``), both with ``model.lm_head``."""
    if isinstance(model, Decoder):
        return model
    from dymu.llm import llama, qwen2, qwen_vl

    adapters = {"qwen2": qwen2.decoder_from, "llama": llama.decoder_from, **qwen_vl.ADAPTERS}
    base = getattr(model, "model", None)
    language_model = getattr(base, "language_model", base)
    lm_head = getattr(model, "lm_head", None)
    if language_model is None or lm_head is None:
        raise DymuError(f"{type(model).__name__} has no decoder LLM with an lm_head (expected a *ForCausalLM or a VLM)")
    model_type = getattr(language_model.config, "model_type", None)
    if model_type not in adapters:
        raise DymuError(f"decoder type {model_type!r} is not supported (supported: {sorted(adapters)})")
    return adapters[model_type](language_model, lm_head, _eos_token_ids(model))


def _eos_token_ids(model: nn.Module) -> tuple[int, ...]:
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return ()


def rope_tables(decoder: Decoder, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (n, hd) for integer ``positions`` (n,), in the model's dtype.

    M-RoPE decoders also take (3, n) (t, h, w) indices; their rotary module mixes the three axes' frequencies
    itself (Qwen2.5-VL by sections, Qwen3-VL interleaved). A 1-D tensor then means t = h = w, as for text.
    """
    probe = torch.empty(0, device=decoder.device, dtype=decoder.dtype)
    positions = positions.to(decoder.device)
    if positions.dim() == 2:
        if not decoder.mrope or positions.shape[0] != 3:
            kind = "M-RoPE decoder" if decoder.mrope else "decoder with 1-D RoPE"
            raise DymuError(f"a {kind} cannot take positions of shape {tuple(positions.shape)}")
        positions = positions[:, None]  # (3, batch 1, n)
    elif decoder.mrope:
        # Spelled out as three equal rows (t = h = w, as for text): older transformers (5.17) take nothing
        # else, newer broadcast (1, n).
        positions = positions[None, None].expand(3, 1, -1)
    else:
        positions = positions[None]
    cos, sin = decoder.rotary_emb(probe, positions)
    return cos[0], sin[0]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (n, H, hd) by position; the two halves of the head dim are the (real, imaginary) pairs."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def project_qkv(decoder: Decoder, layer: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Input norm and q/k/v projections of hidden rows (n, D): q (n, Hq, hd), k and v (n, Hkv, hd)."""
    x = layer.input_layernorm(h)
    attn = layer.self_attn
    n = h.shape[0]
    q = attn.q_proj(x).view(n, decoder.num_heads, decoder.head_dim)
    k = attn.k_proj(x).view(n, decoder.num_kv_heads, decoder.head_dim)
    v = attn.v_proj(x).view(n, decoder.num_kv_heads, decoder.head_dim)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm of each head, row-wise like the rest
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def finish_layer(layer: nn.Module, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """o_proj and residual, then the MLP block with its residual. ``attn_out`` is (n, Hq * hd)."""
    h = h + layer.self_attn.o_proj(attn_out)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def next_token_logits(decoder: Decoder, h: torch.Tensor) -> torch.Tensor:
    """Final norm and lm_head of hidden rows (n, D) -> (n, V)."""
    return decoder.lm_head(decoder.norm(h))

