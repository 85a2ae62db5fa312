"""A pool of fixed-size KV blocks shared by every layer and every sequence, with reference counts.

One pool holds keys and values as (num_blocks * block_size, Hkv, hd) tensors: a *slot* is one entry, block
``b`` owns slots ``b * block_size ... b * block_size + block_size - 1``. Blocks are handed out per layer (a
sequence's layer 3 and layer 4 use different blocks), so pruning the layers after the probe layer gives whole
blocks back even though the earlier layers keep theirs.

A block may be shared read-only (a cached visual prefix): its reference count says by how many holders.
It returns to the free list when the last holder lets go.
"""
from __future__ import annotations

import math

import torch

from dymu.errors import DymuError


def blocks_for_budget(budget_gb: float, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """How many blocks of keys + values fit in ``budget_gb`` GiB."""
    return int(budget_gb * 2**30) // block_bytes(block_size, num_kv_heads, head_dim, dtype)


def block_bytes(block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one block's keys and values."""
    return 2 * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


class BlockManager:
    """The pool's tensors, its free list and every block's reference count."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        if num_blocks < 1 or block_size < 1:
            raise DymuError(f"the KV pool needs at least one block of one entry (got {num_blocks} x {block_size})")
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        # Not zeroed: only written slots are ever read, and untouched CPU pages then cost no memory.
        self.keys = torch.empty(slots, num_kv_heads, head_dim, device=device, dtype=dtype)
        self.values = torch.empty(slots, num_kv_heads, head_dim, device=device, dtype=dtype)
        self.block_bytes = block_bytes(block_size, num_kv_heads, head_dim, dtype)
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest ids go out first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, entries: int) -> int:
        return math.ceil(entries / self.block_size)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, count: int) -> list[int]:
        """``count`` fresh blocks, each with one reference; raises if the pool has fewer free."""
        if count > len(self._free):
            raise DymuError(f"the KV pool has {len(self._free)} free blocks, {count} asked for")
        blocks = [self._free.pop() for _ in range(count)]
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more holder of each of ``blocks`` (which must be in use)."""
        for block in blocks:
            if self._refs[block] < 1:
                raise DymuError(f"block {block} is free and cannot be shared")
            self._refs[block] += 1

    def release(self, blocks: list[int]) -> int:
        """One holder fewer for each block; return how many went back to the free list."""
        freed = 0
        for block in blocks:
            if self._refs[block] < 1:
                raise DymuError(f"block {block} is released more often than it was held")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)
                freed += 1
        return freed

    def slots(self, blocks: list[int], count: int) -> torch.Tensor:
        """The first ``count`` slots of ``blocks``, in order, as an int64 tensor on the pool's device."""
        table = torch.tensor(blocks, dtype=torch.long, device=self.keys.device)
        offsets = torch.arange(self.block_size, device=self.keys.device)
        return (table[:, None] * self.block_size + offsets).reshape(-1)[:count]

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store rotated keys and values (n, Hkv, hd) at ``slots`` (n,)."""
        self.keys.index_copy_(0, slots, keys.to(self.keys.dtype))
        self.values.index_copy_(0, slots, values.to(self.values.dtype))
