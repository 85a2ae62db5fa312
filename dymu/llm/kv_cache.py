"""A KV cache made for pruning: per layer, keys (RoPE already applied) and values in preallocated buffers
with room to grow, and for every entry its RoPE position and whether it is visual.

Layers are independent on purpose: pruning drops visual entries from the layers after the probe layer
only, and ``keep`` compacts the survivors to the front of the buffers so that the next attention really
reads fewer entries. Keys carry their rotation, so a compacted cache needs no re-rotation; positions are
kept for bookkeeping (which original positions survive) and for choosing entries by position.

Both caches (this one and ``GroupedKVCache``) take entries the same way, ``add(layer, keys, values, rows,
positions, visual, cos, sin)``: unrotated keys and values once per row, and for each new entry the row it
plays and its position's rotation. This one expands them; the grouped one stores each row once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dymu.llm.decoder import apply_rope


def attend_new_token(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one new token q (1, Hq, hd) over a layer's cache, keys and values (Hkv, T, hd) -> (1, Hq * hd).

    The query heads that share a KV head are laid along the query-length axis, so grouped-query attention
    needs no copy of the cache; with a single new token there is nothing to mask.
    """
    num_kv_heads = keys.shape[0]
    grouped = q[0].view(num_kv_heads, -1, q.shape[-1])[None]
    out = F.scaled_dot_product_attention(grouped, keys[None], values[None], scale=scale)
    return out.reshape(1, -1)


def attention_probs(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention probabilities (Hkv, Hq / Hkv, T) of one new token q (1, Hq, hd) over keys (Hkv, T, hd), float32."""
    num_kv_heads = keys.shape[0]
    grouped = q[0].view(num_kv_heads, -1, q.shape[-1]).float()
    return (grouped @ keys.float().transpose(1, 2) * scale).softmax(dim=-1)


def grown(buffer: torch.Tensor, dim: int, used: int, capacity: int) -> torch.Tensor:
    """A copy of ``buffer`` with ``capacity`` slots along ``dim``, its first ``used`` slots kept."""
    shape = list(buffer.shape)
    shape[dim] = capacity
    new = buffer.new_empty(shape)
    new.narrow(dim, 0, used).copy_(buffer.narrow(dim, 0, used))
    return new


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

    def add(self, layer: int, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
            visual: torch.Tensor | bool, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Add n entries from unrotated keys and values (R, Hkv, hd), one per row: entry e plays row ``rows[e]``
        at ``positions[e]``, whose rotation is ``cos[e], sin[e]`` (n, hd)."""
        rotated = apply_rope(keys.index_select(0, rows), cos, sin)
        self.append(layer, rotated, values.index_select(0, rows), positions, visual)

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               visual: torch.Tensor | bool) -> None:
        """Add n entries: rotated keys and values (n, Hkv, hd), positions (n,), visual (n,) or one bool for all."""
        start = self._lengths[layer]
        end = start + keys.shape[0]
        if end > self.capacity(layer):
            capacity = max(end, 2 * self.capacity(layer))
            for buffers, dim in ((self._keys, 1), (self._values, 1), (self._positions, 0), (self._visual, 0)):
                buffers[layer] = grown(buffers[layer], dim, start, capacity)
        self._keys[layer][:, start:end] = keys.transpose(0, 1)
        self._values[layer][:, start:end] = values.transpose(0, 1)
        self._positions[layer][start:end] = positions
        self._visual[layer][start:end] = visual
        self._lengths[layer] = end

    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """One new token's (rotated q (1, Hq, hd)) attention output over this layer's entries: (1, Hq * hd)."""
        return attend_new_token(q, self.keys(layer), self.values(layer), scale)

    def attention_weights(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """The new token's attention over this layer's entries (length,), heads averaged, float32."""
        return attention_probs(q, self.keys(layer), scale).mean(dim=(0, 1))

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
        """Bytes held by the live entries' keys, values, positions and flags (not the spare room)."""
        return sum(k[:, :n].numel() * k.element_size() * 2 + n * (8 + 1) for k, n in zip(self._keys, self._lengths))
