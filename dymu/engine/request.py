"""One request inside the engine: its prompt, options, pruner, KV entries and where it stands.

The per-answer rules (validation, EOS set, stop strings, text, the pruner, the result record) are those of
``dymu.llm.generate.Generation``, which each request holds, so that an answer from the engine and from the
single-sequence loop are decided the same way.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dymu.engine.sequence_kv import SequenceKV
from dymu.llm.decoder import Decoder
from dymu.llm.generate import Generation, GenerationResult
from dymu.llm.sequence import VirtualSequence

WAITING, PREFILLING, DECODING, FINISHED = "waiting", "prefilling", "decoding", "finished"
_ids = itertools.count()


def cut_points(mapping: torch.Tensor) -> torch.Tensor:
    """Positions p (ascending, excluding 0, including N) where the prompt may be split into chunks: no row
    is used both before and after p (VTU averages a row over all its positions, so a row stays in one chunk)."""
    n = mapping.shape[0]
    rows = int(mapping.max()) + 1
    order = torch.arange(n, device=mapping.device)
    last = torch.full((rows,), -1, dtype=torch.long, device=mapping.device).scatter_reduce(0, mapping, order, "amax")
    reach = torch.cummax(last.index_select(0, mapping), dim=0).values  # furthest use of any row seen so far
    return (reach == order).nonzero().flatten() + 1


def extended(sequence: VirtualSequence, decoder: Decoder, tokens: list[int]) -> VirtualSequence:
    """``sequence`` followed by ``tokens`` as text (to recompute a preempted answer's cache)."""
    if not tokens:
        return sequence
    ids = torch.tensor(tokens, dtype=torch.long, device=decoder.device)
    with torch.no_grad():
        rows = decoder.embed_tokens(ids).to(sequence.rows.dtype)
    k = len(tokens)
    mapping = torch.cat([sequence.mapping, sequence.num_rows + torch.arange(k, device=decoder.device)])
    visual = torch.cat([sequence.visual, torch.zeros(k, dtype=torch.bool, device=decoder.device)])
    positions = None
    if sequence.positions is not None:
        text = sequence.next_position + torch.arange(k, device=decoder.device)
        positions = torch.cat([sequence.positions, text.expand(sequence.positions.shape[0], k)], dim=1)
    return VirtualSequence(torch.cat([sequence.rows, rows]), mapping, visual, positions, sequence.deepstack)


@dataclass
class StepOutput:
    """What one ``Engine.step`` produced for one request: a new token, and the result once it finished
    (``error`` set instead when it failed); ``prefix_hit``: its visual prefix came from the prefix cache."""

    request_id: int
    token: int | None
    finished: bool
    result: GenerationResult | None = None
    error: str | None = None
    prefix_hit: bool = False


class Request:
    """A prompt being answered. ``prompt`` is what is (re)computed into the cache: the sequence, plus the
    answer's tokens but its last after a preemption."""

    def __init__(self, generation: Generation, prefix_key: str | None, prefix_positions: int,
                 on_token: Callable[[StepOutput], Any] | None) -> None:
        self.id = next(_ids)
        self.generation = generation
        self.sequence: VirtualSequence = generation.sequence
        self.prompt = self.sequence
        self._first_answer_position = self.sequence.next_position  # an M-RoPE max over the prompt: once
        self.prefix_key = prefix_key
        self.prefix_positions = prefix_positions
        self.prefix_hit = False
        self.on_token = on_token
        self.status = WAITING
        self.kv: SequenceKV | None = None
        self.prefilled = 0  # prompt positions already in the cache
        self.cuts = cut_points(self.prompt.mapping)
        self.logits: torch.Tensor | None = None  # next-token logits, when it is this request's turn to pick
        self.error: str | None = None
        self.preemptions = 0
        self.arrived = time.perf_counter()
        self.prefill_started: float | None = None
        config = generation.config
        self.sampler = None
        if config.do_sample and config.seed is not None:
            self.sampler = torch.Generator(device=generation.decoder.device).manual_seed(config.seed)

    @property
    def tokens(self) -> list[int]:
        return self.generation.result.tokens

    @property
    def result(self) -> GenerationResult:
        return self.generation.result

    def next_position(self) -> int:
        """RoPE position of the token fed by the next decode step (the last token picked)."""
        return self._first_answer_position + len(self.tokens) - 1

    def use_sequence(self, sequence: VirtualSequence) -> None:
        """Answer ``sequence`` instead (the no-VTU baseline's consecutive positions), as one chunk."""
        self.sequence = self.prompt = sequence
        self._first_answer_position = sequence.next_position
        self.cuts = self.cuts.new_tensor([sequence.num_positions])

    def prompt_length(self) -> int:
        return self.prompt.num_positions

    def next_chunk_end(self, budget: int) -> int:
        """End of the next prefill chunk: the furthest cut point within ``budget`` positions (at least the
        nearest one), never past the visual prefix's end while that prefix is still to be cached."""
        start = self.prefilled
        cuts = self.cuts[self.cuts > start]
        if self.prefix_key is not None and not self.prefix_hit and start < self.prefix_positions:
            cuts = cuts[cuts <= self.prefix_positions]
        within = cuts[cuts <= start + budget]
        return int(within[-1] if within.numel() else cuts[0])

    def restart(self, decoder: Decoder) -> None:
        """After a preemption: recompute the prompt and the answer so far (its last token is fed next)."""
        self.prompt = extended(self.sequence, decoder, self.tokens[:-1])
        self.cuts = cut_points(self.prompt.mapping)
        self.prefilled = 0
        self.prefix_hit = False
        self.status = WAITING
        self.preemptions += 1
