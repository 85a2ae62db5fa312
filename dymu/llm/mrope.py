"""M-RoPE prompts (Qwen2.5-VL, Qwen3-VL): the stock (t, h, w) positions, and a ``VirtualSequence`` built
from a prompt's token ids with its visual placeholders played by merged rows.

The positions come from the model's own ``get_rope_index``, so they are numbered exactly as the stock model
numbers them: text counts up by one, each visual block's rows are (t, h, w) grid indices offset by the
position where the block starts (Qwen2.5-VL scales t by the seconds per temporal slot; Qwen3-VL puts a text
timestamp before every temporal slot), and text after a block resumes at the block's largest index + 1.
Merged rows change none of that: each original position keeps its index, which is what VTU needs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dymu.errors import DymuError
from dymu.llm.sequence import VirtualSequence
from dymu.tokens import MergedTokens


def visual_token_ids(model: nn.Module) -> tuple[int, int]:
    """The (image, video) placeholder token ids of a Qwen-VL model."""
    config = model.config
    return int(config.image_token_id), int(config.video_token_id)


def stock_positions(model: nn.Module, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                    video_grid_thw: torch.Tensor | None = None,
                    second_per_grid_ts: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """(3, L) int64 M-RoPE positions of a prompt's ids (L,), from the model's own ``get_rope_index``.

    ``image_grid_thw`` / ``video_grid_thw`` are (items, 3) patch grids as the processor returns them;
    ``second_per_grid_ts`` (Qwen2.5-VL video) the seconds each temporal slot spans.
    """
    image_id, video_id = visual_token_ids(model)
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1).cpu()
    if image_grid_thw is None and video_grid_thw is None:
        return torch.arange(ids.shape[1]).expand(3, -1).clone()
    types = torch.zeros_like(ids, dtype=torch.int)
    types[ids == image_id], types[ids == video_id] = 1, 2
    kwargs = {}
    if second_per_grid_ts is not None:
        kwargs["second_per_grid_ts"] = torch.as_tensor(second_per_grid_ts, dtype=torch.float)
    grids = {name: None if grid is None else torch.as_tensor(grid, dtype=torch.long).reshape(-1, 3).cpu()
             for name, grid in (("image_grid_thw", image_grid_thw), ("video_grid_thw", video_grid_thw))}
    try:
        positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, **grids, **kwargs)
    except (StopIteration, RuntimeError, ValueError) as exc:
        raise DymuError(f"the prompt's visual placeholders do not fit the visual grids {grids}: {exc}") from exc
    return positions[:, 0].long()


def sequence_from_ids(model: nn.Module, input_ids: torch.Tensor, visual: MergedTokens | torch.Tensor,
                      positions: torch.Tensor | None,
                      deepstack: list[torch.Tensor] | None = None) -> VirtualSequence:
    """The prompt ``input_ids`` (L,) with its image/video placeholders, in order, played by ``visual``.

    ``visual`` is a ``MergedTokens`` (mapping over the placeholders in prompt order) or (P, D) unmerged
    rows, one per placeholder. ``positions`` (3, L) from ``stock_positions`` (None: 1-D). ``deepstack``:
    per early layer, one row per merged row of ``visual`` (default: ``visual.deepstack``). Text ids are embedded with the model's table.
    """
    from dymu.llm.decoder import load_decoder

    decoder = load_decoder(model)
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).to(decoder.device)
    is_visual = torch.isin(ids, torch.tensor(visual_token_ids(model), device=ids.device))
    if isinstance(visual, MergedTokens):
        visual.validate()
        rows, block_map = visual.embeds, visual.mapping.to(decoder.device)
        if deepstack is None and visual.deepstack:
            deepstack = visual.deepstack
    else:
        rows, block_map = visual, torch.arange(visual.shape[0], device=decoder.device)
    placeholders = int(is_visual.sum())
    if placeholders != block_map.shape[0]:
        raise DymuError(f"the prompt has {placeholders} visual placeholders but the visual tokens stand for "
                        f"{block_map.shape[0]} positions")
    text_ids = ids[~is_visual]
    with torch.no_grad():
        text_rows = decoder.embed_tokens(text_ids)
    mapping = torch.empty_like(ids)
    mapping[~is_visual] = torch.arange(text_ids.shape[0], device=ids.device)
    mapping[is_visual] = block_map + text_ids.shape[0]
    all_rows = torch.cat([text_rows.to(decoder.dtype), rows.to(decoder.device, decoder.dtype)])
    if deepstack is not None:
        deepstack = [d.to(decoder.device, decoder.dtype) for d in deepstack]
    sequence = VirtualSequence(all_rows, mapping, is_visual, positions if positions is None else
                               positions.to(decoder.device), deepstack)
    return sequence.validate(decoder.max_positions)
