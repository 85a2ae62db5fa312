"""Writing an answer: prefill (VTU or not), then one token at a time over our own KV cache, with optional
DyRate-style pruning of the visual entries.

``generate`` returns a ``GenerationResult``; ``Generation`` is the same loop as an iterator of token ids
(for streaming), with the result on ``.result`` once it is exhausted.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from dymu.errors import DymuError
from dymu.llm.config import GenerateConfig
from dymu.llm.decoder import (
    Decoder,
    apply_rope,
    finish_layer,
    load_decoder,
    next_token_logits,
    project_qkv,
    rope_tables,
)
from dymu.llm.grouped_cache import GroupedKVCache
from dymu.llm.kv_cache import KVCache
from dymu.llm.prune import Probe, Pruner, RatePredictor
from dymu.llm.sequence import VirtualSequence
from dymu.llm.vtu import check_sequence, prefill

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """One answer and what it cost.

    tokens: generated token ids (an EOS that ended the answer included); text: their decoded text, cut
    before a stop string (None without a tokenizer). stop_reason: "eos", "stop_string", "max_new_tokens" or
    "context_full". virtual_length: positions the prompt stands for (N); unique_rows: rows actually fed (U);
    visual_positions: visual positions in the prompt. kept_trace: (step, visual entries kept in the pruned
    layers) at the first probe and at every change (empty without pruning). prefill_seconds: prompt time;
    decode_seconds: time of each decode step (step s feeds generated token s). logits: per generated token,
    the logits it was chosen from (float32, CPU), only with ``keep_logits``. cache_entries: KV entries per
    layer at the end.
    """

    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    stop_reason: str = ""
    virtual_length: int = 0
    unique_rows: int = 0
    visual_positions: int = 0
    kept_trace: list[tuple[int, int]] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: list[float] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    cache_entries: list[int] = field(default_factory=list)

    @property
    def decode_ms_per_token(self) -> float:
        return 1000.0 * sum(self.decode_seconds) / max(len(self.decode_seconds), 1)


def new_cache(decoder: Decoder, kind: str, capacity: int) -> KVCache | GroupedKVCache:
    """An empty cache for ``decoder``: "expanded" (every entry's rotated K/V) or "grouped" (each row once)."""
    shape = (decoder.num_layers, decoder.num_kv_heads, decoder.head_dim, capacity, decoder.device, decoder.dtype)
    if kind == "grouped":
        return GroupedKVCache(*shape, rope=lambda positions: rope_tables(decoder, positions))
    if kind == "expanded":
        return KVCache(*shape)
    raise DymuError(f"unknown kv_cache kind {kind!r} (expected 'expanded' or 'grouped')")


@torch.no_grad()
def decode_step(decoder: Decoder, cache: KVCache | GroupedKVCache, token: int, position: int, step: int = 0,
                probe: Probe | None = None) -> torch.Tensor:
    """Feed one token at RoPE ``position``; append its K/V to every layer; return next-token logits (V,).

    With a probe (a ``Pruner``), the attention at its layer is read on the steps it asks for; the layer's
    output is computed exactly as without a probe, so a pruner that keeps everything changes nothing.
    """
    ids = torch.tensor([token], device=decoder.device)
    positions = torch.tensor([position], device=decoder.device)
    cos, sin = rope_tables(decoder, positions)
    own_row = torch.zeros(1, dtype=torch.long, device=decoder.device)
    h = decoder.embed_tokens(ids)
    for i, layer in enumerate(decoder.layers):
        q, k, v = project_qkv(decoder, layer, h)
        cache.add(i, k, v, own_row, positions, False, cos, sin)
        q, scale = apply_rope(q, cos, sin), layer.self_attn.scaling
        out = cache.attend(i, q, scale)
        if probe is not None and i == probe.layer and probe.wants_probe(step):
            probe.observe(step, cache.attention_weights(i, q, scale), cache)
        h = finish_layer(layer, h, out)
    return next_token_logits(decoder, h)[0]


def pick_token(logits: torch.Tensor, config: GenerateConfig, generator: torch.Generator | None) -> int:
    """Greedy argmax, or a sample at ``temperature`` from the top-p nucleus."""
    if not config.do_sample:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep a token if the tokens before it have not yet reached top_p (the first one always stays).
        outside = sorted_probs.cumsum(0) - sorted_probs >= config.top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


class Generation:
    """One answer, as an iterator of token ids; ``result`` is complete once iteration ends.

    ``model`` is a HF model (``*ForCausalLM`` or a LLaVA VLM) or a ``Decoder``. ``tokenizer`` (optional, a HF
    tokenizer) decodes the text and is needed for stop strings. ``predictor`` replaces the pruning rule.
    """

    def __init__(self, model: nn.Module | Decoder, sequence: VirtualSequence, config: GenerateConfig | None = None,
                 tokenizer: Any = None, predictor: RatePredictor | None = None) -> None:
        self.decoder = load_decoder(model)
        self.config = config or GenerateConfig()
        self.sequence = check_sequence(self.decoder, sequence)
        if self.config.stop_strings and tokenizer is None:
            raise DymuError("stop_strings need a tokenizer to decode the answer")
        self.tokenizer = tokenizer
        eos = self.config.eos_token_ids
        self.eos = set(self.decoder.eos_token_ids if eos is None else eos)
        prune = self.config.prune
        if prune.enabled and predictor is None and prune.predictor:
            from dymu.llm.rate_model import LearnedRate  # it imports this module

            predictor = LearnedRate.load(prune.predictor)
        self.pruner = Pruner(prune, self.decoder.num_layers, predictor) if prune.enabled else None
        self.cache: KVCache | GroupedKVCache | None = None
        self.result = GenerationResult(
            virtual_length=self.sequence.num_positions,
            unique_rows=self.sequence.num_rows,
            visual_positions=self.sequence.num_visual,
        )

    def __iter__(self) -> Iterator[int]:
        if self.result.tokens:
            raise DymuError("a Generation runs once; make a new one for another answer")
        decoder, config, result = self.decoder, self.config, self.result
        prompt_entries = self.sequence.num_positions if config.prefill == "vtu" else self.sequence.num_rows
        cache = self.cache = new_cache(decoder, config.kv_cache, prompt_entries + config.max_new_tokens)
        generator = None
        if config.do_sample and config.seed is not None:
            generator = torch.Generator(device=decoder.device).manual_seed(config.seed)

        started = time.perf_counter()
        prompt = prefill(decoder, self.sequence, cache, mode=config.prefill)
        _synchronize(decoder.device)
        result.prefill_seconds = time.perf_counter() - started
        logits, position = prompt.logits, prompt.next_position

        for step in range(1, config.max_new_tokens + 1):
            token = pick_token(logits, config, generator)
            if config.keep_logits:
                result.logits.append(logits.float().cpu())
            result.tokens.append(token)
            yield token
            result.stop_reason = self._stop_reason(position)
            if result.stop_reason:
                break
            started = time.perf_counter()
            logits = decode_step(decoder, cache, token, position, step, self.pruner)
            _synchronize(decoder.device)
            result.decode_seconds.append(time.perf_counter() - started)
            position += 1

        result.text = self._text()
        result.kept_trace = list(self.pruner.trace) if self.pruner else []
        result.cache_entries = [cache.length(i) for i in range(cache.num_layers)]
        log.debug("answer: %d tokens, stop=%s, trace=%s", len(result.tokens), result.stop_reason, result.kept_trace)

    def _stop_reason(self, next_position: int) -> str:
        tokens = self.result.tokens
        if tokens[-1] in self.eos:
            return "eos"
        if self.config.stop_strings and self._find_stop(self._decode(tokens)) is not None:
            return "stop_string"
        if len(tokens) >= self.config.max_new_tokens:
            return "max_new_tokens"
        if next_position >= self.decoder.max_positions:
            return "context_full"
        return ""

    def _find_stop(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.config.stop_strings if s in text]
        return min(hits) if hits else None

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t not in self.eos], skip_special_tokens=True)

    def _text(self) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._decode(self.result.tokens)
        cut = self._find_stop(text) if self.config.stop_strings else None
        return text if cut is None else text[:cut]


def generate(model: nn.Module | Decoder, sequence: VirtualSequence, config: GenerateConfig | None = None,
             tokenizer: Any = None, on_token: Callable[[int], None] | None = None,
             predictor: RatePredictor | None = None) -> GenerationResult:
    """Write one answer to ``sequence``; ``on_token`` is called with each token id as soon as it is chosen."""
    generation = Generation(model, sequence, config, tokenizer, predictor)
    for token in generation:
        if on_token is not None:
            on_token(token)
    return generation.result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
