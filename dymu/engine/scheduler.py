"""Who runs in the next step: admission from the waiting queue by free blocks, room for the decodes,
preemption when the pool runs dry, and the prefill chunks that fit beside the decodes.

Admission is first come, first served, up to ``max_batch`` running sequences: a request is admitted when
the pool has blocks for its whole prompt (minus a cached visual prefix) plus one block per layer to decode
into, after dropping cached prefixes if need be. When a decode step needs blocks the pool does not have,
the latest admitted sequence is preempted: its blocks go back and it waits at the front of the queue, to be
recomputed (prompt + its answer so far) when there is room. A request that could not fit in the empty pool
fails alone.
"""
from __future__ import annotations

from collections import deque

from dymu.engine.block_manager import BlockManager
from dymu.engine.prefix_cache import PrefixCache
from dymu.engine.request import DECODING, FINISHED, PREFILLING, WAITING, Request
from dymu.engine.sequence_kv import SequenceKV


class Scheduler:
    def __init__(self, pool: BlockManager, num_layers: int, max_batch: int, prefix_cache: PrefixCache) -> None:
        self.pool = pool
        self.num_layers = num_layers
        self.max_batch = max_batch
        self.prefix_cache = prefix_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0
        self.most_running = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[Request]:
        """Admit waiting requests while there is room; return those that can never fit (to be failed)."""
        impossible = []
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting[0]
            need = self._blocks_to_admit(request)
            if need > self.pool.num_blocks:
                impossible.append(self.waiting.popleft())
                continue
            if not self._make_room(need):
                break
            self.waiting.popleft()
            self._start(request)
        self.most_running = max(self.most_running, len(self.running))
        return impossible

    def _blocks_to_admit(self, request: Request) -> int:
        entries = request.prompt_length() - self._cached_prefix_length(request)
        return self.num_layers * (self.pool.blocks_for(entries) + 1)

    def _cached_prefix_length(self, request: Request) -> int:
        if request.prefix_key is None or request.preemptions:
            return 0
        entry = self.prefix_cache.peek(request.prefix_key)
        return entry.length if entry is not None and entry.length == request.prefix_positions else 0

    def _start(self, request: Request) -> None:
        kv = request.kv = SequenceKV(self.pool, self.num_layers)
        prompt = request.prompt
        entry = None
        if request.prefix_key is not None and not request.preemptions:
            entry = self.prefix_cache.lookup(request.prefix_key, request.prefix_positions)
        start = 0
        if entry is not None:
            for layer, (blocks, slots, ordinals, visual) in enumerate(entry.layers):
                kv.adopt(layer, blocks, slots, ordinals, visual)
            start = entry.length
            request.prefix_hit = True
        ordinals = prompt.mapping.new_tensor(range(start, prompt.num_positions))
        for layer in range(self.num_layers):
            kv.reserve(layer, prompt.num_positions - start, ordinals, prompt.visual[start:])
        request.prefilled = start
        request.status = PREFILLING
        self.running.append(request)

    def _make_room(self, blocks: int) -> bool:
        """Free blocks by dropping cached prefixes until ``blocks`` are free; False if that is not enough."""
        while self.pool.num_free < blocks and len(self.prefix_cache):
            self.prefix_cache.evict_oldest()
        return self.pool.num_free >= blocks

    def prefill_chunks(self, budget: int) -> list[tuple[Request, int, int]]:
        """(request, start, end) chunks for this step: prompts in admission order, ``budget`` positions in all
        (at least one chunk when any prompt is waiting to be prefilled)."""
        chunks = []
        for request in self.running:
            if request.status != PREFILLING:
                continue
            if chunks and budget <= 0:
                break
            end = request.next_chunk_end(budget)
            chunks.append((request, request.prefilled, end))
            budget -= end - request.prefilled
        return chunks

    def decoding(self) -> list[Request]:
        """The sequences that decode this step, once each has room for its new entry (preempting the latest
        admitted ones if the pool is dry). A lone sequence that still has no room is returned as it is: the
        caller fails it."""
        while True:
            batch = [r for r in self.running if r.status == DECODING]
            need = sum(r.kv.blocks_to_append(1) for r in batch)
            if self._make_room(need):
                return batch
            victim = self.running[-1]
            if victim is batch[0] and len(self.running) == 1:
                return batch  # the engine fails it: nothing else can give room
            self.preempt(victim)

    def preempt(self, request: Request) -> None:
        self.running.remove(request)
        request.kv.release()
        request.kv = None
        if request.tokens:
            request.restart(request.generation.decoder)
        else:
            request.prefilled, request.status, request.prefix_hit = 0, WAITING, False
        self.waiting.appendleft(request)
        self.preemptions += 1

    def finish(self, request: Request) -> None:
        """The request leaves (finished, failed or aborted): its blocks go back at once."""
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        if request.kv is not None:
            request.kv.release()
            request.kv = None
        request.status = FINISHED
