"""One sequence's entries in the block pool: per layer, the blocks it holds and the slot of every entry.

It offers what ``dymu.llm.prune.Pruner`` asks of a cache (``visual``, ``num_visual``, ``positions``,
``keep``, ``num_layers``), so the same pruner drives single-sequence and batched decoding. ``positions``
here are entry ordinals (the virtual position index n, then the answer's tokens), unique per entry even
under M-RoPE, which is all the pruner needs them for: K is stored already rotated.

Pruning (``keep``) compacts the survivors into as few blocks as they need and gives the rest back. Blocks
shared with others (a cached visual prefix) are never written: the survivors are copied out first, into
this sequence's own blocks. Pruning never takes a block from the pool: it runs inside a decode step, whose
appends the scheduler has counted free blocks for, and a copy into fresh blocks would take those (with the
pool full the next layer's append then found none). So when the survivors, with the step's new entry, do
not fit in the blocks the layer owns, the sequence keeps a list of surviving slots where they are, inside
the shared blocks (correct, frees nothing, takes nothing); a later pruning compacts them once they fit.
"""
from __future__ import annotations

import torch

from dymu.engine.block_manager import BlockManager


class LayerKV:
    """One layer of one sequence: held blocks, entries' slots, ordinals and visual flags, and how full the
    last block is (appends go there until it is full or shared).

    Slots, ordinals and flags live in buffers with spare room that double when full, so a decode step's
    append writes one element instead of copying the whole list (which at thousands of entries, every layer
    of every sequence, every step, is a cost the custom path must not add)."""

    def __init__(self, device: torch.device) -> None:
        self.blocks: list[int] = []
        self.tail_fill = 0
        empty = torch.empty(0, dtype=torch.long, device=device)
        self.replace(empty, empty, torch.empty(0, dtype=torch.bool, device=device))

    @property
    def length(self) -> int:
        return self._length

    @property
    def slots(self) -> torch.Tensor:
        return self._slots[: self._length]

    @property
    def ordinals(self) -> torch.Tensor:
        return self._ordinals[: self._length]

    @property
    def visual(self) -> torch.Tensor:
        return self._visual[: self._length]

    def replace(self, slots: torch.Tensor, ordinals: torch.Tensor, visual: torch.Tensor) -> None:
        """Hold exactly these entries. The tensors are adopted, not copied: appends grow into new buffers,
        so tensors shared with others (a cached prefix) are never written."""
        self._slots, self._ordinals, self._visual = slots, ordinals, visual
        self._length = int(slots.shape[0])

    def append(self, slots: torch.Tensor, ordinals: torch.Tensor, visual: torch.Tensor) -> None:
        start, end = self._length, self._length + int(slots.shape[0])
        if end > self._slots.shape[0]:
            capacity = max(2 * end, 64)
            self._slots, self._ordinals, self._visual = (
                _grown(buffer, start, capacity) for buffer in (self._slots, self._ordinals, self._visual))
        self._slots[start:end] = slots
        self._ordinals[start:end] = ordinals
        self._visual[start:end] = visual
        self._length = end

    def append_one(self, slot: int, ordinal: int) -> None:
        """One decoded (non-visual) entry: three element writes, no tensor built."""
        if self._length == self._slots.shape[0]:
            capacity = max(2 * self._length, 64)
            self._slots, self._ordinals, self._visual = (
                _grown(buffer, self._length, capacity) for buffer in (self._slots, self._ordinals, self._visual))
        self._slots[self._length] = slot
        self._ordinals[self._length] = ordinal
        self._visual[self._length] = False
        self._length += 1


def _grown(buffer: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    out = torch.empty(capacity, dtype=buffer.dtype, device=buffer.device)
    out[:length] = buffer[:length]
    return out


class SequenceKV:
    """The KV entries of one sequence across ``num_layers`` layers of ``pool``."""

    def __init__(self, pool: BlockManager, num_layers: int) -> None:
        self.pool = pool
        self.device = pool.keys.device
        self.layers = [LayerKV(self.device) for _ in range(num_layers)]
        self.blocks_freed_by_pruning = 0

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def length(self, layer: int) -> int:
        return self.layers[layer].length

    def num_blocks(self) -> int:
        return sum(len(layer.blocks) for layer in self.layers)

    # --- the pruner's view ---------------------------------------------------------------------------
    def visual(self, layer: int) -> torch.Tensor:
        return self.layers[layer].visual

    def num_visual(self, layer: int) -> int:
        return int(self.layers[layer].visual.sum())

    def positions(self, layer: int) -> torch.Tensor:
        return self.layers[layer].ordinals

    def keep(self, layer: int, index: torch.Tensor) -> None:
        """Keep only the entries at ``index`` (ascending), compacted into as few own blocks as they need."""
        kv = self.layers[layer]
        pool = self.pool
        slots = kv.slots.index_select(0, index)
        ordinals, visual = kv.ordinals.index_select(0, index), kv.visual.index_select(0, index)
        own = [b for b in kv.blocks if pool.refs(b) == 1]
        shared = [b for b in kv.blocks if pool.refs(b) > 1]
        needed = pool.blocks_for(int(index.shape[0]))
        if pool.blocks_for(int(index.shape[0]) + 1) > len(own):
            # Only shared blocks can hold the survivors and this step's entry: a keep list, nothing freed or taken.
            kv.replace(slots, ordinals, visual)
            return
        keys, values = pool.keys.index_select(0, slots), pool.values.index_select(0, slots)
        kv.blocks = own[:needed]
        freed = pool.release(own[needed:]) + pool.release(shared)
        self.blocks_freed_by_pruning += freed
        kv.replace(pool.slots(kv.blocks, int(index.shape[0])), ordinals, visual)
        pool.write(kv.slots, keys, values)
        kv.tail_fill = int(index.shape[0]) - (needed - 1) * pool.block_size if needed else 0

    # --- growth --------------------------------------------------------------------------------------
    def blocks_to_append(self, count: int) -> int:
        """Blocks that appending ``count`` entries to every layer would take from the pool."""
        return sum(self._new_blocks(kv, count) for kv in self.layers)

    def _new_blocks(self, kv: LayerKV, count: int) -> int:
        room = 0
        if kv.blocks and self.pool.refs(kv.blocks[-1]) == 1:
            room = self.pool.block_size - kv.tail_fill
        return self.pool.blocks_for(max(count - room, 0))

    def reserve(self, layer: int, count: int, ordinals: torch.Tensor, visual: torch.Tensor | bool) -> torch.Tensor:
        """Make room for ``count`` new entries at the end of ``layer``; return their slots (count,)."""
        kv, pool = self.layers[layer], self.pool
        new = []
        if kv.blocks and pool.refs(kv.blocks[-1]) == 1 and kv.tail_fill < pool.block_size:
            take = min(count, pool.block_size - kv.tail_fill)
            start = kv.blocks[-1] * pool.block_size + kv.tail_fill
            new.append(torch.arange(start, start + take, device=self.device))
            kv.tail_fill += take
            count -= take
        if count > 0:
            blocks = pool.allocate(pool.blocks_for(count))
            kv.blocks.extend(blocks)
            new.append(pool.slots(blocks, count))
            kv.tail_fill = count - (len(blocks) - 1) * pool.block_size
        slots = torch.cat(new) if len(new) > 1 else new[0]
        kv.append(slots, ordinals.to(self.device), visual if isinstance(visual, bool) else visual.to(self.device))
        return slots

    def reserve_one(self, layer: int, ordinal: int) -> int:
        """The slot of one new entry at the end of ``layer`` (a decode step's): ``reserve`` for one entry,
        in plain integers, since every layer of every running sequence does this every step."""
        kv, pool = self.layers[layer], self.pool
        if kv.blocks and kv.tail_fill < pool.block_size and pool.refs(kv.blocks[-1]) == 1:
            slot = kv.blocks[-1] * pool.block_size + kv.tail_fill
            kv.tail_fill += 1
        else:
            block = pool.allocate(1)[0]
            kv.blocks.append(block)
            slot, kv.tail_fill = block * pool.block_size, 1
        kv.append_one(slot, ordinal)
        return slot

    def adopt(self, layer: int, blocks: list[int], slots: torch.Tensor, ordinals: torch.Tensor,
              visual: torch.Tensor) -> None:
        """Start ``layer`` (empty) from shared entries: one more reference on each of ``blocks``."""
        self.pool.share(blocks)
        kv = self.layers[layer]
        kv.blocks = list(blocks)
        kv.replace(slots, ordinals, visual)
        kv.tail_fill = self.pool.block_size  # the shared tail block is never appended to

    def release(self) -> int:
        """Let go of every block (the sequence finished, failed or was preempted); return blocks freed."""
        freed = 0
        for layer in range(self.num_layers):
            freed += self.pool.release(self.layers[layer].blocks)
            self.layers[layer] = LayerKV(self.device)
        return freed
