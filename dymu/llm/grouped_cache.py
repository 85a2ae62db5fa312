"""A KV cache that keeps each merged group's key and value once, and applies RoPE per entry.

With VTU, the N prompt entries of a merged visual block come from U << N rows: all the entries of a group
have the same value and the same key before rotation; only the RoPE rotation differs, by position. This
cache stores every row's unrotated key and its value once, plus a table of entries (row, position,
visual). To attend, it rotates each entry's key at its own position (from a cos/sin table it keeps) for
the scores, then sums each row's probabilities before multiplying by the values, so the value product
runs over rows, not entries. It holds about U/N of the expanded cache's K/V memory and recomputes the
rotations at every step. Exact for RoPE types whose frequencies do not change with the sequence length
(all but "dynamic").
"""
from __future__ import annotations

from typing import Callable

import torch

from dymu.llm.decoder import apply_rope
from dymu.llm.kv_cache import attention_probs, grown

RopeTable = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class GroupedKVCache:
    """Same interface as ``KVCache``; ``rope(positions) -> (cos, sin)`` gives rotations (n, hd)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 device: torch.device | str, dtype: torch.dtype, rope: RopeTable) -> None:
        capacity = max(capacity, 1)
        row_shape = (capacity, num_kv_heads, head_dim)
        self._keys = [torch.empty(row_shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self._values = [torch.empty(row_shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self._entry_rows = [torch.empty(capacity, device=device, dtype=torch.long) for _ in range(num_layers)]
        self._positions = [torch.empty(capacity, device=device, dtype=torch.long) for _ in range(num_layers)]
        self._visual = [torch.empty(capacity, device=device, dtype=torch.bool) for _ in range(num_layers)]
        self._num_rows = [0] * num_layers
        self._lengths = [0] * num_layers
        self._rope = rope
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return len(self._keys)

    def length(self, layer: int) -> int:
        return self._lengths[layer]

    def num_rows(self, layer: int) -> int:
        return self._num_rows[layer]

    def positions(self, layer: int) -> torch.Tensor:
        return self._positions[layer][: self._lengths[layer]]

    def visual(self, layer: int) -> torch.Tensor:
        return self._visual[layer][: self._lengths[layer]]

    def num_visual(self, layer: int) -> int:
        return int(self.visual(layer).sum())

    def add(self, layer: int, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
            visual: torch.Tensor | bool, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Store the rows' unrotated keys and values (R, Hkv, hd) once and one entry per position; ``cos`` and
        ``sin`` are not needed, rotations are recomputed from positions when attending."""
        row_start, entry_start = self._num_rows[layer], self._lengths[layer]
        row_end, entry_end = row_start + keys.shape[0], entry_start + rows.shape[0]
        if row_end > self._keys[layer].shape[0]:
            capacity = max(row_end, 2 * self._keys[layer].shape[0])
            for buffers in (self._keys, self._values):
                buffers[layer] = grown(buffers[layer], 0, row_start, capacity)
        if entry_end > self._positions[layer].shape[0]:
            capacity = max(entry_end, 2 * self._positions[layer].shape[0])
            for buffers in (self._entry_rows, self._positions, self._visual):
                buffers[layer] = grown(buffers[layer], 0, entry_start, capacity)
        self._keys[layer][row_start:row_end] = keys
        self._values[layer][row_start:row_end] = values
        self._entry_rows[layer][entry_start:entry_end] = rows + row_start
        self._positions[layer][entry_start:entry_end] = positions
        self._visual[layer][entry_start:entry_end] = visual
        self._num_rows[layer], self._lengths[layer] = row_end, entry_end

    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """One new token's (rotated q (1, Hq, hd)) attention output over this layer's entries: (1, Hq * hd)."""
        probs = attention_probs(q, self._rotated_keys(layer), scale)  # (Hkv, G, T)
        num_rows = self._num_rows[layer]
        per_row = probs.new_zeros(probs.shape[0], probs.shape[1], num_rows)
        per_row.index_add_(2, self._entry_rows[layer][: self._lengths[layer]], probs)
        values = self._values[layer][:num_rows].transpose(0, 1)  # (Hkv, R, hd)
        return (per_row.to(values.dtype) @ values).reshape(1, -1)

    def attention_weights(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        return attention_probs(q, self._rotated_keys(layer), scale).mean(dim=(0, 1))

    def keep(self, layer: int, index: torch.Tensor) -> None:
        """Keep only the entries at ``index`` (ascending); rows no entry plays any more are dropped too."""
        n = int(index.shape[0])
        entry_rows = self._entry_rows[layer][index]
        used = torch.unique(entry_rows)  # sorted
        renumber = torch.empty(self._num_rows[layer], dtype=torch.long, device=used.device)
        renumber[used] = torch.arange(used.shape[0], device=used.device)
        self._keys[layer][: used.shape[0]] = self._keys[layer][used]
        self._values[layer][: used.shape[0]] = self._values[layer][used]
        self._entry_rows[layer][:n] = renumber[entry_rows]
        self._positions[layer][:n] = self._positions[layer][index]
        self._visual[layer][:n] = self._visual[layer][index]
        self._num_rows[layer], self._lengths[layer] = int(used.shape[0]), n

    def nbytes(self) -> int:
        """Bytes held by the live rows' keys and values and by the entry table."""
        total = 0
        for keys, rows, entries in zip(self._keys, self._num_rows, self._lengths):
            total += keys[:rows].numel() * keys.element_size() * 2 + entries * (8 + 8 + 1)
        return total

    def _rotated_keys(self, layer: int) -> torch.Tensor:
        """Every entry's key rotated at its own position: (Hkv, T, hd)."""
        positions = self.positions(layer)
        cos, sin = self._rope_at(positions)
        keys = self._keys[layer].index_select(0, self._entry_rows[layer][: self._lengths[layer]])
        return apply_rope(keys, cos, sin).transpose(0, 1)

    def _rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        needed = int(positions.max()) + 1
        if self._cos is None or self._cos.shape[0] < needed:
            size = max(needed, 2 * (0 if self._cos is None else self._cos.shape[0]))
            self._cos, self._sin = self._rope(torch.arange(size, device=positions.device))
        return self._cos[positions], self._sin[positions]
