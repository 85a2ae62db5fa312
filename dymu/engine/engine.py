"""The engine: many answers at once over one paged KV pool.

    engine = Engine(model, tokenizer, EngineConfig(kv_cache_gb=2, max_batch=16))
    first = engine.add_request(sequence, GenerateConfig(max_new_tokens=128))
    while engine.has_unfinished():
        for out in engine.step():         # StepOutput(request_id, token, finished, result, error)
            ...

Each ``step`` admits what fits, decodes every running sequence by one token (one batch), prefills prompt
chunks beside them (``prefill_chunk`` positions per step, so decodes keep flowing) and retires finished
sequences at once, freeing their blocks. Greedy answers equal ``dymu.llm.generate``'s token for token.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from dymu.engine.attention import BACKENDS, make_decode_attention
from dymu.engine.block_manager import BlockManager, blocks_for_budget
from dymu.engine.prefix_cache import PrefixCache
from dymu.engine.request import DECODING, PREFILLING, Request, StepOutput
from dymu.engine.runner import decode, prefill_chunks
from dymu.engine.scheduler import Scheduler
from dymu.errors import DymuError
from dymu.llm.config import GenerateConfig
from dymu.llm.decoder import Decoder, load_decoder
from dymu.llm.generate import Generation, GenerationResult, pick_token
from dymu.llm.prune import RatePredictor
from dymu.llm.sequence import VirtualSequence

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """kv_cache_gb: the KV pool (keys + values of every layer); prefix_cache_gb: how much of it cached
    visual prefixes may hold; max_batch: most sequences running at once; block_size: entries per block;
    prefill_chunk: prompt positions prefilled per step beside the decodes (a chunk never splits a merged row,
    so one may be longer); attention: the decode attention over the pool, "sdpa", "flex" or "auto" (flex on
    CUDA when available, else sdpa; see ``dymu.engine.attention``)."""

    kv_cache_gb: float = 1.0
    prefix_cache_gb: float = 0.0
    max_batch: int = 16
    block_size: int = 16
    prefill_chunk: int = 2048
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_gb <= 0:
            raise DymuError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.prefix_cache_gb < 0:
            raise DymuError(f"prefix_cache_gb must be >= 0, got {self.prefix_cache_gb}")
        if self.max_batch < 1:
            raise DymuError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.block_size < 1 or self.prefill_chunk < 1:
            raise DymuError("block_size and prefill_chunk must be >= 1")
        if self.attention not in BACKENDS:
            raise DymuError(f"attention must be one of {', '.join(BACKENDS)}, got {self.attention!r}")


class Engine:
    """Continuous batching over a ``BlockManager`` pool; requests are added and aborted at any time."""

    def __init__(self, model: nn.Module | Decoder, tokenizer: Any = None, config: EngineConfig | None = None) -> None:
        self.decoder = load_decoder(model)
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        d = self.decoder
        num_blocks = blocks_for_budget(config.kv_cache_gb, config.block_size, d.num_kv_heads, d.head_dim, d.dtype)
        if num_blocks < d.num_layers:
            raise DymuError(f"kv_cache_gb={config.kv_cache_gb} holds less than one block per layer")
        self.pool = BlockManager(num_blocks, config.block_size, d.num_kv_heads, d.head_dim, d.device, d.dtype)
        self.attention = make_decode_attention(config.attention, d.device)
        self.attention.prepare(self.pool)
        prefix_blocks = min(num_blocks, blocks_for_budget(config.prefix_cache_gb, config.block_size, d.num_kv_heads,
                                                          d.head_dim, d.dtype))
        self.prefix_cache = PrefixCache(self.pool, prefix_blocks)
        self.scheduler = Scheduler(self.pool, d.num_layers, config.max_batch, self.prefix_cache)
        self.requests: dict[int, Request] = {}
        self.blocks_freed_by_pruning = 0
        self.steps = 0
        self.aborted = 0

    # --- requests ------------------------------------------------------------------------------------
    def add_request(self, sequence: VirtualSequence, config: GenerateConfig | None = None, prefix_key: str | None = None,
                    prefix_positions: int | None = None, on_token: Callable[[StepOutput], Any] | None = None,
                    predictor: RatePredictor | None = None) -> int:
        """Queue an answer to ``sequence``; return its id. Bad input raises ``DymuError`` here, at once.

        prefix_key / prefix_positions: name the first ``prefix_positions`` positions (the prompt up to the end
        of its visual block) for the visual-prefix cache. ``on_token`` is called with each ``StepOutput``.
        """
        config = config or GenerateConfig()
        if config.kv_cache != "expanded":
            raise DymuError("the engine keeps an expanded KV cache (kv_cache='expanded')")
        generation = Generation(self.decoder, sequence, config, self.tokenizer, predictor)
        if prefix_key is not None:
            if prefix_positions is None or not 0 < prefix_positions < generation.sequence.num_positions:
                raise DymuError("prefix_positions must be given and lie inside the prompt (text must follow it)")
            if config.prefill != "vtu":
                prefix_key = None  # positions of the no-VTU baseline are not the prompt's own
        request = Request(generation, prefix_key, prefix_positions or 0, on_token)
        if config.prefill == "no_vtu":
            request.use_sequence(generation.sequence.consecutive())
        self.requests[request.id] = request
        self.scheduler.add(request)
        return request.id

    def abort(self, request_id: int) -> bool:
        """Drop a request wherever it is; its blocks go back at once. False if it is unknown or done."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.finish(request)
        self.aborted += 1
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- one step ------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Admit, decode the running sequences by one token, prefill chunks, retire finished sequences."""
        outputs = [self._fail(r, f"the prompt needs more KV blocks than the whole pool holds "
                                 f"(kv_cache_gb={self.config.kv_cache_gb})") for r in self.scheduler.admit()]
        batch = self.scheduler.decoding()
        if batch and sum(r.kv.blocks_to_append(1) for r in batch) > self.pool.num_free:
            outputs += [self._fail(r, "the KV pool is too small for this answer (raise kv_cache_gb)") for r in batch]
            batch = []
        picked: list[tuple[Request, torch.Tensor, int | None]] = []
        if batch:
            started = time.perf_counter()
            freed_before = sum(r.kv.blocks_freed_by_pruning for r in batch)
            logits = decode(self.decoder, self.pool, batch, self.attention)
            _synchronize(self.decoder.device)
            seconds = time.perf_counter() - started
            self.blocks_freed_by_pruning += sum(r.kv.blocks_freed_by_pruning for r in batch) - freed_before
            greedy = logits.argmax(dim=-1).tolist()  # one call for the batch, not one per sequence
            for b, request in enumerate(batch):
                request.result.decode_seconds.append(seconds)
                picked.append((request, logits[b], None if request.generation.config.do_sample else greedy[b]))
        spans = self.scheduler.prefill_chunks(self.config.prefill_chunk)
        started = time.perf_counter()
        chunk_logits = prefill_chunks(self.decoder, self.pool, spans) if spans else []
        _synchronize(self.decoder.device)
        seconds = time.perf_counter() - started
        for (request, start, end), logits in zip(spans, chunk_logits):
            request.result.prefill_seconds += seconds * (end - start) / sum(e - s for _, s, e in spans)
            request.prefilled = end
            if request.prefix_key is not None and not request.prefix_hit and end == request.prefix_positions \
                    and not request.preemptions:
                self.prefix_cache.store(request.prefix_key, request.kv, end)
            if logits is not None:
                request.status = DECODING
                if not request.tokens:  # a recomputed answer already has the token it feeds next
                    picked.append((request, logits, None))
        for request, logits, token in picked:
            outputs.append(self._pick(request, logits, token))
        self.steps += 1
        for out in outputs:
            request = self.requests.get(out.request_id)
            if out.finished:
                self.requests.pop(out.request_id, None)
            if request is not None and request.on_token is not None:
                request.on_token(out)
        return outputs

    def _pick(self, request: Request, logits: torch.Tensor, token: int | None = None) -> StepOutput:
        """Take ``token`` (already picked greedily) or pick one from ``logits``; stop or go on."""
        generation, config = request.generation, request.generation.config
        if token is None:
            token = pick_token(logits, config, request.sampler)
        if config.keep_logits:
            request.result.logits.append(logits.float().cpu())
        request.tokens.append(token)
        stop = generation._stop_reason(request.next_position())
        if not stop:
            return StepOutput(request.id, token, False)
        result = request.result
        result.stop_reason = stop
        result.text = generation._text()
        result.kept_trace = list(generation.pruner.trace) if generation.pruner else []
        result.cache_entries = [request.kv.length(i) for i in range(request.kv.num_layers)]
        self.scheduler.finish(request)
        return StepOutput(request.id, token, True, result, prefix_hit=request.prefix_hit)

    def _fail(self, request: Request, error: str) -> StepOutput:
        request.error = error
        self.scheduler.finish(request)
        log.warning("request %d failed: %s", request.id, error)
        return StepOutput(request.id, None, True, None, error)

    # --- convenience ---------------------------------------------------------------------------------
    def run(self) -> dict[int, GenerationResult | str]:
        """Step until every request has finished; return each one's result (or its error line) by id."""
        done: dict[int, GenerationResult | str] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out.result if out.error is None else out.error
        return done

    def stats(self) -> dict[str, Any]:
        pool = self.pool
        return {
            "attention": self.attention.name,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "decoding": sum(r.status == DECODING for r in self.scheduler.running),
            "prefilling": sum(r.status == PREFILLING for r in self.scheduler.running),
            "most_running": self.scheduler.most_running,
            "preemptions": self.scheduler.preemptions,
            "aborted": self.aborted,
            "kv_blocks": pool.num_blocks,
            "kv_blocks_free": pool.num_free,
            "kv_bytes_in_use": (pool.num_blocks - pool.num_free) * pool.block_bytes,
            "kv_bytes_freed_by_pruning": self.blocks_freed_by_pruning * pool.block_bytes,
            "prefix_entries": len(self.prefix_cache),
            "prefix_bytes": self.prefix_cache.num_blocks * pool.block_bytes,
            "prefix_hits": self.prefix_cache.hits,
            "prefix_misses": self.prefix_cache.misses,
            "steps": self.steps,
        }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
