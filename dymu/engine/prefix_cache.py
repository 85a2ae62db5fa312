"""The visual-prefix cache: the KV entries of a prompt up to the end of its visual block, kept after the
request that made them has left, so a later question about the same video prefills only its own words.

The caller names a prefix with a key that must change with everything that changes those entries: the video's
token-cache key (content hash + model + every setting that changes the tokens), the prompt text before the
visual block and, with M-RoPE, the prefix's positions. Entries hold a reference on their blocks (read-only:
whoever adopts them appends and prunes into blocks of its own) and are dropped least recently used first, when
over ``budget_blocks`` or when the pool needs the room.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from dymu.engine.block_manager import BlockManager
from dymu.engine.sequence_kv import SequenceKV


@dataclass
class PrefixEntry:
    """``length`` entries per layer: the blocks holding them, and their slots, ordinals and visual flags."""

    length: int
    layers: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]

    @property
    def num_blocks(self) -> int:
        return sum(len(blocks) for blocks, *_ in self.layers)


class PrefixCache:
    """A bounded LRU of ``PrefixEntry`` by key."""

    def __init__(self, pool: BlockManager, budget_blocks: int) -> None:
        self.pool = pool
        self.budget_blocks = budget_blocks
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_blocks(self) -> int:
        return sum(entry.num_blocks for entry in self._entries.values())

    def peek(self, key: str) -> PrefixEntry | None:
        """The entry for ``key``, without counting a hit or refreshing it."""
        return self._entries.get(key)

    def lookup(self, key: str, length: int) -> PrefixEntry | None:
        """The entry for ``key`` if it holds exactly ``length`` entries (counted as a hit or a miss)."""
        entry = self._entries.get(key)
        if entry is None or entry.length != length:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def store(self, key: str, kv: SequenceKV, length: int) -> None:
        """Keep the first ``length`` entries of every layer of ``kv`` (which must hold just those so far)."""
        if self.budget_blocks <= 0 or key in self._entries:
            return
        layers = []
        for kv_layer in kv.layers:
            blocks = kv_layer.blocks[: self.pool.blocks_for(length)]
            # Copies of the index lists (the holder's buffers grow in place); the KV blocks themselves are shared.
            layers.append((blocks, kv_layer.slots[:length].clone(), kv_layer.ordinals[:length].clone(),
                           kv_layer.visual[:length].clone()))
        entry = PrefixEntry(length, layers)
        if entry.num_blocks > self.budget_blocks:
            return
        for blocks, *_ in layers:
            self.pool.share(blocks)
        self._entries[key] = entry
        while self.num_blocks > self.budget_blocks:
            self.evict_oldest()

    def evict_oldest(self) -> int:
        """Drop the least recently used entry; return the blocks that went back to the pool (0 if empty)."""
        if not self._entries:
            return 0
        _, entry = self._entries.popitem(last=False)
        return sum(self.pool.release(blocks) for blocks, *_ in entry.layers)

    def clear(self) -> None:
        while self._entries:
            self.evict_oldest()
