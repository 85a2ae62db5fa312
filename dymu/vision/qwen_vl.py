"""DToMe inside the vision encoders of Qwen2.5-VL and Qwen3-VL.

Both encoders cut a frame pair (one temporal slot) into 14 px (Qwen3-VL: 16 px) patches, run ViT blocks with
2D rotary positions, and concatenate each 2x2 group of patches through a merger MLP into one LLM token.
Qwen2.5-VL attends inside 112 px windows (8x8 patches) in most blocks and over the whole slot in a few;
Qwen3-VL attends over the whole slot everywhere and feeds DeepStack mergers from intermediate blocks.
DToMe here keeps that structure valid:

- **Merge units.** ``grouping="group"`` (the default) merges whole 2x2 groups: a unit is the 4 patches one
  merger token reads, its metric their keys side by side, a merge the size-weighted mean of both units'
  4 rows position by position. The merger then sees valid input: one call per unit. ``grouping="patch"``
  merges single patches and runs the merger once per distinct 4-tuple of merged rows (measured against the
  default in ``bench/encoder.py --family qwen2.5-vl --compare``).
- **Windows.** Merge candidates must share a window (Qwen2.5-VL), so windowed blocks keep attending within
  their windows, now of variable length: one SDPA call per window on CPU, all windows of a batch as one
  padded call on an accelerator.
- **Rotary positions.** ``rotary="mean"`` (the default) gives a merged row one rotation, at the mean
  (h, w) of the patches it stands for, plus proportional attention (log size on its key). ``rotary="exact"``
  expands q/k/v to every patch, rotates each by its own position, attends at full length and averages each
  row's outputs back (VTU's form): the projections and MLP still run on the merged rows only.
- **DeepStack** (Qwen3-VL): a tap's merger runs on the rows of its block, and each final row gets the mean
  of the tap features of the merger cells it stands for: the same merge map as the final features.

Thresholds 1.0 merge nothing and reproduce ``get_image_features`` / ``get_video_features``. Thresholds
files come from `dymu-video calibrate` (``dymu.vision.qwen_model.QwenFrameEncoder`` gives their fingerprint):
``QwenDToMeEncoder(visual, taus=thresholds.taus)``. Inputs: ``dymu.vision.qwen_inputs`` (the processor's
pixels, fps sampling, slot times).

Results are one ``MergedTokens`` per image or video (per ``grid_thw`` row):

- ``embeds`` (U, D_llm): merger outputs of the merged rows; ``sizes`` (U,): merger cells each stands for;
- ``mapping`` (N,): for every merger cell in the stock model's order (temporal slot, then the row-major
  (h/2, w/2) grid the LLM sees), the row that stands for it; rows never span two slots;
- ``positions_per_frame``: cells per temporal slot (h/2 * w/2, t entries); ``timestamps``: seconds of each
  slot when the caller gave them;
- ``deepstack``: Qwen3-VL only, one (U, D_llm) tensor per DeepStack tap, rows as ``embeds``;
- ``meta`` keys (stable): ``"family"`` ("qwen2.5-vl" | "qwen3-vl"), ``"grid_thw"`` [t, h, w] in patches,
  ``"merge_size"`` (2), ``"seconds_per_slot"`` (float; 0.0 for an image or when not given),
  ``"slot_timestamps"`` (list of float, seconds of each slot; empty for an image).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dymu.errors import DymuError
from dymu.merge import TokenState, attention_bias, bipartite_edges, merge_tokens
from dymu.tokens import MergedTokens
from dymu.vision.runner import MergePolicy, ThresholdPolicy

GROUPINGS = ("group", "patch")
ROTARY_FORMS = ("mean", "exact")
_MODEL_TYPES = {"qwen2_5_vl_vision": "qwen2.5-vl", "qwen3_vl_vision": "qwen3-vl"}


def qwen_vision_family(visual: nn.Module) -> str | None:
    """``qwen2.5-vl`` / ``qwen3-vl`` for their vision models, else None."""
    return _MODEL_TYPES.get(getattr(getattr(visual, "config", None), "model_type", None))


@dataclass
class SlotLayout:
    """Geometry of one temporal slot of an (h, w) patch grid, in the encoder's internal order.

    cell_order: (c,) row-major cell index (the LLM's order) of each internal cell.
    cell_window: (c,) attention window of each internal cell (all 0 without windows).
    patch_hw: (c, 4, 2) float (h, w) rotary coordinates of each cell's 4 patches.
    """

    cell_order: Tensor
    cell_window: Tensor
    patch_hw: Tensor

    @property
    def num_cells(self) -> int:
        return int(self.cell_order.shape[0])


def slot_layout(visual: nn.Module, h: int, w: int, device: torch.device) -> SlotLayout:
    """The stock encoder's own patch order, windows and rotary positions for one slot (its helpers)."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    merge = visual.spatial_merge_size
    grid = torch.tensor([[1, h, w]])
    cells = (h // merge) * (w // merge)
    position = get_vision_position_ids(grid, merge).view(cells, merge * merge, 2)
    if qwen_vision_family(visual) == "qwen2.5-vl":
        order, cu = get_vision_window_index(grid, merge, visual.window_size, visual.patch_size)
        window_cells = torch.diff(cu.long()) // (merge * merge)
        window = torch.repeat_interleave(torch.arange(len(window_cells)), window_cells)
    else:
        order, window = torch.arange(cells), torch.zeros(cells, dtype=torch.long)
    return SlotLayout(order.to(device), window.to(device), position[order].float().to(device))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of (R, H, hd) rows by per-row (R, hd) angles, in float32 as the stock encoder does."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def _segment_attention(q: Tensor, k: Tensor, v: Tensor, key_sizes: Tensor | None, lengths: list[int],
                       scale: float) -> Tensor:
    """SDPA of (R, H, hd) rows cut into contiguous segments, each attending within itself only.

    ``key_sizes`` (R,) adds log(size) to each key (None: no bias). Segments of one length run as one batched
    call. Ragged ones (merged windows) run one call each on CPU, where padding them to one batch (copying q, k
    and v and attending over the padding) took up to 1.6x as long, and as one padded call elsewhere, where one
    launch beats many."""
    if q.device.type == "cpu" and len(set(lengths)) > 1:
        sizes = key_sizes.split(lengths) if key_sizes is not None else [None] * len(lengths)
        outs = []
        for qs, ks, vs, size in zip(q.split(lengths), k.split(lengths), v.split(lengths), sizes):
            bias = attention_bias(size[None].float(), q.dtype) if size is not None else None
            qs, ks, vs = (t.transpose(0, 1)[None] for t in (qs, ks, vs))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias, scale=scale)[0].transpose(0, 1))
        return torch.cat(outs)
    holder = TokenState(x=q, sizes=key_sizes if key_sizes is not None else q.new_ones(q.shape[0]),
                        lengths=lengths, mapping=q.new_zeros(0, dtype=torch.long))
    bias = None
    if key_sizes is not None or not holder.uniform:
        bias = attention_bias(holder.to_padded(holder.sizes.float()), q.dtype)
    qp, kp, vp = (holder.to_padded(t).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=bias, scale=scale)
    return holder.to_packed(out.transpose(1, 2))


@dataclass
class _Batch:
    """Slots of one grid size, run together. ``g`` rows per unit; positions are units in internal order."""

    layout: SlotLayout
    g: int
    state: TokenState
    unit_hw: Tensor  # (N, g, 2) rotary coordinates of each position's rows
    unit_window: Tensor  # (N,) window of each position
    # Per row, kept until the next merge changes the rows: (cos, sin) of its rotary position, and (Qwen2.5-VL)
    # its window with the rows of each window, one entry per (slot, window).
    rotary: tuple[Tensor, Tensor] | None = None
    windows: tuple[Tensor, list[int]] | None = None

    def row_items(self) -> Tensor:
        return torch.repeat_interleave(torch.arange(len(self.state.lengths), device=self.state.x.device),
                                       torch.tensor(self.state.lengths, device=self.state.x.device))

    def global_mapping(self) -> Tensor:
        """(B, N) packed row of every position."""
        return self.state.mapping + self.state.offsets()[:, None]

    def row_hw(self) -> Tensor:
        """(M, g, 2) mean rotary coordinates of the positions each row stands for."""
        m = self.global_mapping().flatten()
        coords = self.unit_hw.expand(len(self.state.lengths), -1, -1, -1).flatten(0, 1)
        total = coords.new_zeros(self.state.x.shape[0], self.g, 2).index_add_(0, m, coords)
        return total / self.state.sizes[:, None, None]

    def row_windows(self) -> tuple[Tensor, list[int]]:
        """(M,) window of each row, and the number of rows in each (slot, window) in row order."""
        window = torch.empty(self.state.x.shape[0], dtype=torch.long, device=self.state.x.device)
        window[self.global_mapping().flatten()] = self.unit_window.repeat(len(self.state.lengths))
        keys = window + self.row_items() * (int(self.unit_window.max()) + 1)
        return window, torch.unique_consecutive(keys, return_counts=True)[1].tolist()


class QwenDToMeEncoder:
    """A Qwen2.5-VL / Qwen3-VL vision model run with DToMe, with the model's own weights.

    ``taus``: one threshold per block (None: all 1.0, the stock features). ``grouping`` and ``rotary``:
    see the module docstring.
    """

    def __init__(self, visual: nn.Module, taus: Sequence[float] | None = None, grouping: str = "group",
                 rotary: str = "mean"):
        self.family = qwen_vision_family(visual)
        if self.family is None:
            raise DymuError(f"not a Qwen2.5-VL / Qwen3-VL vision model: {type(visual).__name__}")
        if grouping not in GROUPINGS:
            raise DymuError(f"unknown grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")
        if rotary not in ROTARY_FORMS:
            raise DymuError(f"unknown rotary form {rotary!r}; choose one of {', '.join(ROTARY_FORMS)}")
        self.visual = visual
        self.grouping, self.rotary = grouping, rotary
        self.num_layers = len(visual.blocks)
        self.taus = [1.0] * self.num_layers if taus is None else [float(t) for t in taus]
        if len(self.taus) != self.num_layers:
            raise DymuError(f"{len(self.taus)} thresholds given for {self.num_layers} encoder blocks")
        config = visual.config
        self.full_blocks = set(getattr(config, "fullatt_block_indexes", range(self.num_layers)))
        self.windowed = self.family == "qwen2.5-vl"
        self.deepstack_taps = list(getattr(config, "deepstack_visual_indexes", []) or [])

    @property
    def merge_unit(self) -> int:
        return self.visual.spatial_merge_size ** 2

    def __call__(self, pixel_values: Tensor, grid_thw: Tensor, seconds_per_slot: Sequence[float] | None = None,
                 slot_timestamps: Sequence[Sequence[float]] | None = None) -> list[MergedTokens]:
        """Merged tokens of each image / video, from the processor's ``pixel_values`` and ``grid_thw``."""
        return self.run(pixel_values, grid_thw, ThresholdPolicy(self.taus), seconds_per_slot, slot_timestamps)

    @torch.no_grad()
    def run(self, pixel_values: Tensor, grid_thw: Tensor, policy: MergePolicy,
            seconds_per_slot: Sequence[float] | None = None,
            slot_timestamps: Sequence[Sequence[float]] | None = None) -> list[MergedTokens]:
        """As ``__call__`` with any merge policy (calibration merges the batch's top edges)."""
        grid = torch.as_tensor(grid_thw, dtype=torch.long).cpu()
        if grid.dim() != 2 or grid.shape[1] != 3:
            raise DymuError(f"grid_thw must have shape (n, 3), got {tuple(grid.shape)}")
        if int(grid.prod(-1).sum()) != pixel_values.shape[0]:
            raise DymuError(f"grid_thw covers {int(grid.prod(-1).sum())} patches, pixel_values has "
                            f"{pixel_values.shape[0]}")
        embeds = self._embed(pixel_values, grid)
        slots = []  # (entry, slot, h, w, embeddings (h*w, D) block-major)
        for entry, (t, h, w) in enumerate(grid.tolist()):
            for slot, rows in enumerate(embeds[: t * h * w].view(t, h * w, -1)):
                slots.append((entry, slot, h, w, rows))
            embeds = embeds[t * h * w:]
        results: dict[tuple[int, int], tuple] = {}
        for (h, w) in dict.fromkeys((s[2], s[3]) for s in slots):
            members = [s for s in slots if (s[2], s[3]) == (h, w)]
            outs = self._run_group(torch.stack([s[4] for s in members]), h, w, policy)
            results.update({(s[0], s[1]): out for s, out in zip(members, outs)})
        tokens = []
        for entry, (t, h, w) in enumerate(grid.tolist()):
            seconds = float(seconds_per_slot[entry]) if seconds_per_slot is not None else 0.0
            stamps = [float(x) for x in slot_timestamps[entry]] if slot_timestamps is not None else []
            tokens.append(self._to_tokens([results[(entry, s)] for s in range(t)], (t, h, w), seconds, stamps))
        return tokens

    def _embed(self, pixel_values: Tensor, grid: Tensor) -> Tensor:
        """Patch embeddings (+ Qwen3-VL's interpolated learned positions), block-major, as the stock model."""
        visual = self.visual
        weight = visual.patch_embed.proj.weight
        x = visual.patch_embed(pixel_values.to(device=weight.device, dtype=weight.dtype))
        if self.family == "qwen3-vl":
            from transformers.vision_utils import get_vision_interpolation_indices_and_weights

            index, weights = get_vision_interpolation_indices_and_weights(
                grid.to(weight.device), num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
                align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size)
            x = x + (visual.pos_embed(index) * weights[:, :, None]).sum(1).to(x.dtype)
        return x

    def _run_group(self, x: Tensor, h: int, w: int, policy: MergePolicy) -> list[tuple]:
        """Run all blocks on B slots of one (h, w) grid; x (B, h*w, D) block-major."""
        layout = slot_layout(self.visual, h, w, x.device)
        batch_size, _, dim = x.shape
        unit = self.merge_unit
        g = unit if self.grouping == "group" else 1
        cells = layout.num_cells
        x = x.view(batch_size, cells, unit, dim)[:, layout.cell_order]  # internal (window) order
        n = cells * unit // g
        state = TokenState(
            x=x.reshape(batch_size * n, g * dim),
            sizes=torch.ones(batch_size * n, device=x.device, dtype=torch.float32),
            lengths=[n] * batch_size,
            mapping=torch.arange(n, device=x.device).expand(batch_size, n).contiguous(),
        )
        batch = _Batch(layout, g, state, layout.patch_hw.view(n, g, 2),
                       layout.cell_window.repeat_interleave(unit // g))
        taps = []
        for index, block in enumerate(self.visual.blocks):
            batch = self._block(index, block, batch, policy)
            if index in self.deepstack_taps:
                merger = self.visual.deepstack_merger_list[self.deepstack_taps.index(index)]
                cell_group, inputs = self._cell_groups(batch)
                taps.append((cell_group, merger(inputs.view(-1, dim))))
        cell_group, inputs = self._cell_groups(batch)
        features = self.visual.merger(inputs.view(-1, dim))
        return self._split_slots(batch, cell_group, features, taps)

    def _block(self, index: int, block: nn.Module, batch: _Batch, policy: MergePolicy) -> _Batch:
        state, g = batch.state, batch.g
        dim = state.x.shape[1] // g
        attn = block.attn
        rows = state.x.view(-1, dim)
        qkv = attn.qkv(block.norm1(rows)).view(rows.shape[0], 3, attn.num_heads, -1)
        q, k, v = qkv.unbind(1)
        windowed = self.windowed and index not in self.full_blocks
        merged = any(state.merged())
        if batch.rotary is None:
            batch = dataclasses.replace(batch, rotary=self.visual.rotary_pos_emb(rows, batch.row_hw().view(-1, 2)),
                                        windows=batch.row_windows() if self.windowed else None)
        if self.rotary == "exact" and merged:
            out = self._exact_attention(batch, q, k, v, attn.scaling, windowed)
        else:
            cos, sin = batch.rotary
            if windowed:
                lengths = [n * g for n in batch.windows[1]]
            else:
                lengths = [n * g for n in state.lengths]
            sizes = state.sizes.repeat_interleave(g) if merged else None
            out = _segment_attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v, sizes, lengths, attn.scaling)
        x = state.x + attn.proj(out.flatten(1)).view_as(state.x)
        state = dataclasses.replace(state, x=x)
        if policy.active(index):
            metric = state.to_padded(k.sum(dim=1).reshape(state.x.shape[0], -1))
            segments = state.to_padded(batch.windows[0]) if self.windowed else None
            edges = bipartite_edges(metric, state.to_padded(state.sizes), segments=segments)
            merge = policy.choose(index, edges)
            if bool(merge.any()):
                state = merge_tokens(state, edges, merge)
                batch = dataclasses.replace(batch, rotary=None, windows=None)
        rows = state.x.view(-1, dim)
        state = dataclasses.replace(state, x=(rows + block.mlp(block.norm2(rows))).view_as(state.x))
        return dataclasses.replace(batch, state=state)

    def _exact_attention(self, batch: _Batch, q: Tensor, k: Tensor, v: Tensor, scale: float,
                         windowed: bool) -> Tensor:
        """Attention at full length: each patch with its own rotation, outputs averaged back per row."""
        state, g = batch.state, batch.g
        index = (batch.global_mapping()[..., None] * g + torch.arange(g, device=q.device)).flatten()
        hw = batch.unit_hw.expand(len(state.lengths), -1, -1, -1).reshape(-1, 2)
        cos, sin = self.visual.rotary_pos_emb(q, hw)
        qf, kf, vf = _rotate(q[index], cos, sin), _rotate(k[index], cos, sin), v[index]
        n = batch.unit_hw.shape[0]
        if windowed:
            per_window = torch.unique_consecutive(batch.unit_window, return_counts=True)[1] * g
            lengths = per_window.tolist() * len(state.lengths)
        else:
            lengths = [n * g] * len(state.lengths)
        out = _segment_attention(qf, kf, vf, None, lengths, scale)
        total = out.new_zeros(q.shape[0], *out.shape[1:]).index_add_(0, index, out)
        return total / state.sizes.repeat_interleave(g).to(out.dtype)[:, None, None]

    def _cell_groups(self, batch: _Batch) -> tuple[Tensor, Tensor]:
        """For every merger cell (B, c) the merger input it reads, and those inputs (K, 4*D).

        Units of 4 patches are their own inputs; single patches form one input per distinct 4-tuple."""
        state = batch.state
        mapping = batch.global_mapping()
        if batch.g > 1:
            return mapping, state.x
        dim = state.x.shape[1]
        tuples = mapping.view(-1, self.merge_unit)
        distinct, inverse = torch.unique(tuples, dim=0, return_inverse=True)
        return inverse.view(mapping.shape[0], -1), state.x[distinct.flatten()].view(-1, self.merge_unit * dim)

    def _split_slots(self, batch: _Batch, cell_group: Tensor, features: Tensor, taps: list) -> list[tuple]:
        """Per slot: (features (U, D'), sizes (U,), mapping (c,) stock order, [tap features (U, D')])."""
        order = batch.layout.cell_order
        outs = []
        for b in range(cell_group.shape[0]):
            stock = torch.empty_like(cell_group[b])
            stock[order] = cell_group[b]  # internal -> the LLM's row-major order
            groups, mapping = torch.unique(stock, return_inverse=True)
            # Rows in the order of their first cell, so that the result does not depend on the batch.
            first = torch.full((len(groups),), len(stock), device=stock.device, dtype=torch.long)
            first.scatter_reduce_(0, mapping, torch.arange(len(stock), device=stock.device), reduce="amin")
            rank = torch.argsort(first)
            mapping = torch.argsort(rank)[mapping]
            groups = groups[rank]
            sizes = torch.bincount(mapping, minlength=len(groups))
            deep = []
            for tap_group, tap_features in taps:
                tap_stock = torch.empty_like(tap_group[b])
                tap_stock[order] = tap_group[b]
                total = tap_features.new_zeros(len(groups), tap_features.shape[1])
                total.index_add_(0, mapping, tap_features[tap_stock])
                deep.append(total / sizes[:, None].to(total.dtype))
            outs.append((features[groups], sizes, mapping, deep))
        return outs

    def _to_tokens(self, slots: list[tuple], thw: tuple[int, int, int], seconds: float,
                   stamps: list[float]) -> MergedTokens:
        offsets = torch.tensor([0] + [s[0].shape[0] for s in slots[:-1]]).cumsum(0).tolist()
        deep = [torch.cat([s[3][i] for s in slots]) for i in range(len(self.deepstack_taps))]
        return MergedTokens(
            embeds=torch.cat([s[0] for s in slots]),
            sizes=torch.cat([s[1] for s in slots]),
            mapping=torch.cat([s[2] + o for s, o in zip(slots, offsets)]),
            positions_per_frame=[int(s[2].shape[0]) for s in slots],
            timestamps=list(stamps),
            deepstack=deep,
            meta={"family": self.family, "grid_thw": list(thw), "merge_size": self.visual.spatial_merge_size,
                  "seconds_per_slot": seconds, "slot_timestamps": list(stamps)},
        )
