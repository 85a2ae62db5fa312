"""A KV cache made for pruning: per layer, keys (RoPE already applied) and values in preallocated buffers
with room to grow, and for every entry its RoPE position and whether it is visual.

Layers are independent on purpose: pruning drops visual entries from the layers after the probe layer
only, and ``keep`` compacts the survivors to the front of the buffers so that the next attention really
reads fewer entries. Keys carry their rotation, so a compacted cache needs no re-rotation; positions are
kept for bookkeeping (which original positions survive) and for choosing entries by position.
"""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of ``num_layers`` layers, each a (Hkv, capacity, hd) buffer filled to ``length(i)``."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (num_kv_heads, max(capacity, 1), head_dim)
        self._keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self._values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self._positions = [torch.empty(shape[1], device=device, dtype=torch.long) for _ in range(num_layers)]
        self._visual = [torch.empty(shape[1], device=device, dtype=torch.bool) for _ in range(num_layers)]
        self._lengths = [0] * num_layers

    @property
    def num_layers(self) -> int:
        return len(self._keys)

    def length(self, layer: int) -> int:
        return self._lengths[layer]

    def capacity(self, layer: int) -> int:
        return self._keys[layer].shape[1]

    def keys(self, layer: int) -> torch.Tensor:
        """(Hkv, length, hd), a view into the buffer."""
        return self._keys[layer][:, : self._lengths[layer]]

    def values(self, layer: int) -> torch.Tensor:
        return self._values[layer][:, : self._lengths[layer]]

    def positions(self, layer: int) -> torch.Tensor:
        """(length,) RoPE position of every entry."""
        return self._positions[layer][: self._lengths[layer]]

    def visual(self, layer: int) -> torch.Tensor:
        """(length,) True for visual entries (the only ones pruning may drop)."""
        return self._visual[layer][: self._lengths[layer]]

    def num_visual(self, layer: int) -> int:
        return int(self.visual(layer).sum())

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               visual: torch.Tensor | bool) -> None:
        """Add n entries: keys and values (n, Hkv, hd), positions (n,), visual (n,) or one bool for all."""
        start = self._lengths[layer]
        end = start + keys.shape[0]
        if end > self.capacity(layer):
            self._grow(layer, max(end, 2 * self.capacity(layer)))
        self._keys[layer][:, start:end] = keys.transpose(0, 1)
        self._values[layer][:, start:end] = values.transpose(0, 1)
        self._positions[layer][start:end] = positions
        self._visual[layer][start:end] = visual
        self._lengths[layer] = end

    def keep(self, layer: int, index: torch.Tensor) -> None:
        """Keep only the entries at ``index`` (ascending), moved to the front of the buffers."""
        n = int(index.shape[0])
        # Advanced indexing copies before the assignment, so overlapping source and target are safe.
        self._keys[layer][:, :n] = self._keys[layer][:, index]
        self._values[layer][:, :n] = self._values[layer][:, index]
        self._positions[layer][:n] = self._positions[layer][index]
        self._visual[layer][:n] = self._visual[layer][index]
        self._lengths[layer] = n

    def nbytes(self) -> int:
        """Bytes held by the live entries' keys and values (not the spare room)."""
        return sum(k[:, :n].numel() * k.element_size() * 2 for k, n in zip(self._keys, self._lengths))

    def _grow(self, layer: int, capacity: int) -> None:
        n = self._lengths[layer]
        for buffers in (self._keys, self._values):
            old = buffers[layer]
            new = old.new_empty((old.shape[0], capacity, old.shape[2]))
            new[:, :n] = old[:, :n]
            buffers[layer] = new
        for buffers in (self._positions, self._visual):
            old = buffers[layer]
            new = old.new_empty(capacity)
            new[:n] = old[:n]
            buffers[layer] = new
