"""Decode attention over the paged KV pool: one new query per sequence against that sequence's entries.

Two backends compute the same thing (``attention_backend`` in the config, ``EngineConfig.attention``):

* ``sdpa``: gather each sequence's entries out of the pool into a padded (B, Hkv, longest, hd) batch and run
  one ``scaled_dot_product_attention`` with a length mask. Works everywhere; the gather copies every entry
  once per layer and step.
* ``flex``: PyTorch's FlexAttention straight on the pool, nothing gathered. The pool is the key/value
  sequence, one query per sequence, and a ``BlockMask`` lists, per sequence, the pool blocks it holds (so a
  kernel visits only those) while its ``mask_mod`` keeps exactly the sequence's own slots inside them (a
  block's unwritten tail, entries pruned into a keep list). On CUDA the call is compiled; elsewhere it runs
  eagerly (PyTorch's reference path: correct, slow, and dense over the pool, so meant for tests).

``auto`` picks ``flex`` on CUDA when FlexAttention imports, ``sdpa`` otherwise.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, Protocol

import torch

from dymu.engine.block_manager import BlockManager
from dymu.engine.runner import batched_decode_attention
from dymu.config import ATTENTION_BACKENDS
from dymu.errors import DymuError

log = logging.getLogger(__name__)

BACKENDS = ATTENTION_BACKENDS


class DecodeAttention(Protocol):
    name: str

    def prepare(self, pool: BlockManager) -> None:
        """Called once on the engine's pool before any decode."""

    def __call__(self, q: torch.Tensor, pool: BlockManager, slots: list[torch.Tensor], scale: float) -> torch.Tensor:
        """q (B, Hq, hd), one query per sequence, over the entries at ``slots[b]``: (B, Hq * hd)."""


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend ``name`` means on ``device``: ``auto`` is ``flex`` on CUDA when it imports, else ``sdpa``."""
    if name not in BACKENDS:
        raise DymuError(f"attention_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        return "flex" if torch.device(device).type == "cuda" and flex_available() else "sdpa"
    if name == "flex" and not flex_available():
        raise DymuError("attention_backend flex needs torch.nn.attention.flex_attention (PyTorch >= 2.5)")
    return name


def make_decode_attention(name: str, device: torch.device | str) -> DecodeAttention:
    backend = resolve_backend(name, device)
    return FlexDecodeAttention(torch.device(device)) if backend == "flex" else SdpaDecodeAttention()


class SdpaDecodeAttention:
    """Each sequence's entries gathered into a padded batch, then one SDPA call with a length mask."""

    name = "sdpa"

    def prepare(self, pool: BlockManager) -> None:
        pass

    def __call__(self, q: torch.Tensor, pool: BlockManager, slots: list[torch.Tensor], scale: float) -> torch.Tensor:
        return batched_decode_attention(q, pool, slots, scale)


def paged_membership(slots: list[torch.Tensor], block_size: int, num_blocks: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the flex block mask needs from the sequences' slots:

    kv_num_blocks (B, 1, 1) and kv_indices (B, 1, 1, most): per sequence, the pool blocks it has entries in;
    local (num_blocks,): each touched block's row in ``member`` (-1: touched by none);
    member (B, touched * block_size): whether slot offset o of touched block k is sequence b's entry.
    """
    device = slots[0].device
    per_sequence = [torch.unique(s // block_size) for s in slots]
    touched = torch.unique(torch.cat(per_sequence))
    local = torch.full((num_blocks,), -1, dtype=torch.long, device=device)
    local[touched] = torch.arange(touched.shape[0], device=device)
    member = torch.zeros(len(slots), touched.shape[0] * block_size, dtype=torch.bool, device=device)
    owner = torch.cat([torch.full_like(s, b) for b, s in enumerate(slots)])
    flat = torch.cat(slots)
    member[owner, local[flat // block_size] * block_size + flat % block_size] = True
    most = max(int(b.shape[0]) for b in per_sequence)
    kv_indices = torch.zeros(len(slots), 1, 1, most, dtype=torch.int32, device=device)
    for b, blocks in enumerate(per_sequence):
        kv_indices[b, 0, 0, : blocks.shape[0]] = blocks.to(torch.int32)
    kv_num_blocks = torch.tensor([int(b.shape[0]) for b in per_sequence], dtype=torch.int32,
                                 device=device).view(-1, 1, 1)
    return kv_num_blocks, kv_indices, local, member


class FlexDecodeAttention:
    """FlexAttention over the pool itself: a block mask of each sequence's pool blocks, a mask_mod of its slots.

    The pool is zeroed once (``prepare``): a kernel reads whole blocks, and the never-written slots of a
    block it visits must not hold NaNs even though they are masked (a masked NaN still poisons p @ V).
    Should its very first call fail (a compiled kernel this GPU or PyTorch build lacks), it warns and decodes
    with SDPA from then on (``name`` then says ``sdpa``); a failure after that is raised."""

    def __init__(self, device: torch.device) -> None:
        from torch.nn.attention.flex_attention import flex_attention

        self._flex: Callable = flex_attention
        self._calls = 0
        self._fallback: SdpaDecodeAttention | None = None  # set if the first call fails (an untested kernel)
        if device.type == "cuda":
            # dynamic: batch size and blocks per sequence change every step; one compiled kernel serves them
            self._flex = torch.compile(flex_attention, dynamic=True)
        else:  # the eager reference path is the point here (tests): no need to be told it is unfused
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

    @property
    def name(self) -> str:
        return "flex" if self._fallback is None else "sdpa"

    def prepare(self, pool: BlockManager) -> None:
        pool.keys.zero_()
        pool.values.zero_()

    def __call__(self, q: torch.Tensor, pool: BlockManager, slots: list[torch.Tensor], scale: float) -> torch.Tensor:
        from torch.nn.attention.flex_attention import BlockMask

        if self._fallback is not None:
            return self._fallback(q, pool, slots, scale)
        batch, num_heads, head_dim = q.shape
        block_size, total = pool.block_size, pool.keys.shape[0]
        kv_num_blocks, kv_indices, local, member = paged_membership(slots, block_size, pool.num_blocks)

        def own_slot(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - FlexAttention's mask_mod signature
            row = local[kv_idx // block_size]
            column = row.clamp(min=0) * block_size + kv_idx % block_size
            return (row >= 0) & member[b, column]

        mask = BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=(1, block_size), mask_mod=own_slot,
                                        seq_lengths=(1, total))
        keys = pool.keys.transpose(0, 1)[None].expand(batch, -1, -1, -1)  # (B, Hkv, slots, hd), a view
        values = pool.values.transpose(0, 1)[None].expand(batch, -1, -1, -1)
        try:
            out = self._flex(q[:, :, None, :], keys, values, block_mask=mask, scale=scale, enable_gqa=True)
        except Exception as exc:  # noqa: BLE001 - only on the first call: a kernel this GPU or build lacks
            if self._calls:
                raise
            log.warning("FlexAttention failed on its first decode (%s: %s); decoding with SDPA instead",
                        type(exc).__name__, exc)
            self._fallback = SdpaDecodeAttention()
            return self._fallback(q, pool, slots, scale)
        self._calls += 1
        return out.reshape(batch, num_heads * head_dim)
