"""DToMe inside the tiny Qwen2.5-VL and Qwen3-VL vision encoders, loaded through transformers' from_pretrained."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dymu.errors import DymuError
from dymu.tokens import MergedTokens
from dymu.vision import qwen_vl
from dymu.vision.qwen_vl import QwenDToMeEncoder, slot_layout
from tests import media


def _load(path, family):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    cls = Qwen2_5_VLForConditionalGeneration if family == "qwen2.5-vl" else Qwen3VLForConditionalGeneration
    return cls.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def qwen25(tiny_qwen25):
    return _load(tiny_qwen25, "qwen2.5-vl")


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3):
    return _load(tiny_qwen3, "qwen3-vl")


@pytest.fixture(params=["qwen2.5-vl", "qwen3-vl"])
def qwen(request):
    return request.getfixturevalue("qwen25" if request.param == "qwen2.5-vl" else "qwen3")


def _flat(h: int = 224, w: int = 280) -> Image.Image:
    frame = np.zeros((h, w, 3), np.uint8)
    frame[:] = (90, 120, 200)
    return Image.fromarray(frame)


def _noise(h: int = 224, w: int = 280, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _textured(size: int = 224, seed: int = 3) -> Image.Image:
    return Image.fromarray(media.textured_frame(size, seed=seed))


def _images(processor, images):
    inputs = processor.image_processor(images=images, return_tensors="pt")
    return inputs["pixel_values"], inputs["image_grid_thw"]


def _video(processor, num_frames: int = 6, seed: int = 0):
    frames = np.stack([media.textured_frame(112, seed=seed + i) for i in range(num_frames)])
    inputs = processor.video_processor(videos=[frames], do_sample_frames=False, return_tensors="pt")
    return inputs["pixel_values_videos"], inputs["video_grid_thw"]


def _encoder(model, tau: float | None = None, **kwargs) -> QwenDToMeEncoder:
    visual = model.model.visual
    taus = None if tau is None else [tau] * len(visual.blocks)
    return QwenDToMeEncoder(visual, taus=taus, **kwargs)


@pytest.mark.parametrize("rotary", ["mean", "exact"])
@pytest.mark.parametrize("grouping", ["group", "patch"])
def test_thresholds_one_give_the_stock_image_and_video_features(qwen, grouping, rotary):
    model, processor = qwen
    for kind, (pixels, grid) in {
        "image": _images(processor, [_noise(), _textured(), _flat(168, 196)]),
        "video": _video(processor),
    }.items():
        with torch.no_grad():
            getter = model.model.get_image_features if kind == "image" else model.model.get_video_features
            stock = getter(pixels, grid)
        tokens = _encoder(model, grouping=grouping, rotary=rotary)(pixels, grid)
        assert len(tokens) == len(stock.pooler_output)
        for merged, features in zip(tokens, stock.pooler_output):
            assert merged.num_unique == merged.num_positions == features.shape[0]
            torch.testing.assert_close(merged.embeds[merged.mapping], features, rtol=1e-5, atol=1e-5)
        taps = getattr(stock, "deepstack_features", None) or []
        assert len(taps) == len(tokens[0].deepstack) == len(
            getattr(model.config.vision_config, "deepstack_visual_indexes", None) or [])
        for i, tap in enumerate(taps):
            for merged, features in zip(tokens, tap):
                torch.testing.assert_close(merged.deepstack[i][merged.mapping], features, rtol=1e-5, atol=1e-5)


def test_merged_tokens_keep_the_contract_and_the_llm_order(qwen):
    model, processor = qwen
    pixels, grid = _video(processor, num_frames=6)
    (tokens,) = _encoder(model, 0.5)(pixels, grid, seconds_per_slot=[1.0], slot_timestamps=[[0.25, 1.25, 2.25]])
    t, h, w = grid[0].tolist()
    cells = h * w // 4
    tokens.validate()  # the mapping is a partition and the sizes are its group sizes
    assert tokens.num_unique < tokens.num_positions
    assert int(tokens.sizes.sum()) == tokens.num_positions == t * cells
    assert tokens.positions_per_frame == [cells] * t
    assert tokens.timestamps == [0.25, 1.25, 2.25]
    assert tokens.meta == {"family": qwen_vl.qwen_vision_family(model.model.visual), "grid_thw": [t, h, w],
                           "merge_size": 2, "seconds_per_slot": 1.0, "slot_timestamps": [0.25, 1.25, 2.25]}
    # Rows never span two temporal slots: temporal merging is a later, separate step.
    slot_of_position = tokens.frame_of_position()
    for row in range(tokens.num_unique):
        assert len(set(slot_of_position[tokens.mapping == row].tolist())) == 1
    # Round trip through the cache format, DeepStack included.
    back = MergedTokens.from_bytes(tokens.to_bytes())
    assert len(back.deepstack) == len(tokens.deepstack)
    assert all(torch.equal(a, b) for a, b in zip(back.deepstack, tokens.deepstack))


@pytest.mark.parametrize("grouping", ["group", "patch"])
def test_merges_never_cross_an_attention_window(qwen25, grouping):
    model, processor = qwen25
    pixels, grid = _images(processor, [_flat(336, 448), _noise(336, 448)])
    # tau -1 merges as much as the bipartite cap allows: nothing but the windows holds merges back.
    tokens = _encoder(model, -1.0, grouping=grouping)(pixels, grid)
    for merged, (_, h, w) in zip(tokens, grid.tolist()):
        layout = slot_layout(model.model.visual, h, w, torch.device("cpu"))
        window_of_cell = torch.empty_like(layout.cell_window)
        window_of_cell[layout.cell_order] = layout.cell_window
        assert int(window_of_cell.max()) > 0  # several windows to cross
        for row in range(merged.num_unique):
            assert len(set(window_of_cell[merged.mapping == row].tolist())) == 1
        assert merged.num_unique >= int(window_of_cell.max()) + 1


def test_flat_images_keep_far_fewer_tokens_than_textured_ones(qwen):
    model, processor = qwen
    pixels, grid = _images(processor, [_flat(), _noise()])
    flat, noise = _encoder(model, 0.9)(pixels, grid)
    assert flat.num_positions == noise.num_positions
    assert flat.num_unique * 4 < noise.num_unique


@pytest.mark.parametrize("rotary", ["mean", "exact"])
def test_batched_and_single_runs_agree(qwen, rotary):
    model, processor = qwen
    images = [_noise(seed=1), _textured(), _flat(), _noise(168, 196, seed=2)]
    encoder = _encoder(model, 0.6, rotary=rotary)
    together = encoder(*_images(processor, images))
    for image, merged in zip(images, together):
        (alone,) = encoder(*_images(processor, [image]))
        assert torch.equal(alone.mapping, merged.mapping)
        torch.testing.assert_close(alone.embeds, merged.embeds, rtol=1e-5, atol=1e-5)
        for a, b in zip(alone.deepstack, merged.deepstack):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_deepstack_features_follow_the_final_merge_map(qwen3):
    model, processor = qwen3
    pixels, grid = _images(processor, [_textured(256)])
    (merged,) = _encoder(model, 0.5)(pixels, grid)
    assert merged.num_unique < merged.num_positions
    with torch.no_grad():
        stock = model.model.get_image_features(pixels, grid)
    # With merging, a row's tap feature stays close to the mean of the stock features of its cells.
    for i, tap in enumerate(stock.deepstack_features):
        mean = torch.zeros_like(merged.deepstack[i]).index_add_(0, merged.mapping, tap[0])
        mean /= merged.sizes[:, None].float()
        assert merged.deepstack[i].shape == merged.embeds.shape
        cosine = torch.nn.functional.cosine_similarity(merged.deepstack[i], mean, dim=-1)
        assert float(cosine.mean()) > 0.8


def _cell_patch_hw(h: int, w: int) -> torch.Tensor:
    """(cells, 4, 2) (h, w) rotary coordinates of each merger cell's patches, cells in the LLM's row-major order."""
    from transformers.vision_utils import get_vision_position_ids

    return get_vision_position_ids(torch.tensor([[1, h, w]]), 2).view(h * w // 4, 4, 2).double()


def _sorted_rows(hw: torch.Tensor) -> torch.Tensor:
    """Rows (M, 4, 2) in lexicographic order of their coordinates (the encoder's row order is its own)."""
    flat = hw.flatten(1)
    for column in reversed(range(flat.shape[1])):
        flat = flat[torch.argsort(flat[:, column], stable=True)]
    return flat


def test_a_merged_row_is_rotated_at_the_mean_position_of_its_patches(qwen):
    """Merging in the first block only: the next block's rotary angles are taken at each row's mean (h, w),
    patch by patch of its 2x2 cells (the rows of its merged cells averaged), not at its first cell's."""
    model, processor = qwen
    visual = model.model.visual
    pixels, grid = _images(processor, [_flat(112, 112)])
    calls = []
    hook = visual.rotary_pos_emb.register_forward_hook(lambda module, args, out: calls.append(args[1].double()))
    try:
        taus = [-1.0] + [1.0] * (len(visual.blocks) - 1)
        (merged,) = QwenDToMeEncoder(visual, taus=taus)(pixels, grid)
    finally:
        hook.remove()
    _, h, w = grid[0].tolist()
    assert merged.num_unique < merged.num_positions and len(calls) == 2  # before and after the merge
    cells = _cell_patch_hw(h, w)
    mean = torch.zeros(merged.num_unique, 4, 2, dtype=torch.float64).index_add_(0, merged.mapping, cells)
    mean /= merged.sizes[:, None, None].double()
    first = cells[[int((merged.mapping == row).nonzero()[0]) for row in range(merged.num_unique)]]
    assert not torch.allclose(_sorted_rows(mean), _sorted_rows(first))  # the two rules differ here
    torch.testing.assert_close(_sorted_rows(calls[-1].view(-1, 4, 2)), _sorted_rows(mean))


def test_deepstack_rows_hold_the_mean_of_their_cells_tap_features(qwen3):
    """Merging in the last block only, after both DeepStack taps: each row's tap features are, value for
    value, the mean of the stock tap features of the cells it stands for (not their sum)."""
    model, processor = qwen3
    visual = model.model.visual
    pixels, grid = _images(processor, [_flat(128, 128)])
    taus = [1.0] * (len(visual.blocks) - 1) + [-1.0]
    assert max(visual.config.deepstack_visual_indexes) < len(visual.blocks) - 1
    (merged,) = QwenDToMeEncoder(visual, taus=taus)(pixels, grid)
    assert int(merged.sizes.max()) > 1
    with torch.no_grad():
        stock = model.model.get_image_features(pixels, grid)
    for ours, tap in zip(merged.deepstack, stock.deepstack_features, strict=True):
        mean = torch.zeros_like(ours).index_add_(0, merged.mapping, tap[0]) / merged.sizes[:, None].float()
        torch.testing.assert_close(ours, mean, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused(qwen25):
    model, processor = qwen25
    pixels, grid = _images(processor, [_noise()])
    with pytest.raises(DymuError, match="covers"):
        _encoder(model)(pixels[:-4], grid)
    with pytest.raises(DymuError, match="grouping"):
        _encoder(model, grouping="rows")
    with pytest.raises(DymuError, match="rotary"):
        _encoder(model, rotary="none")
    with pytest.raises(DymuError, match="thresholds given"):
        QwenDToMeEncoder(model.model.visual, taus=[0.5])
    with pytest.raises(DymuError, match="not a Qwen"):
        QwenDToMeEncoder(torch.nn.Linear(2, 2))


def test_thresholds_one_give_the_stock_features_in_bfloat16(tiny_qwen25, tiny_qwen3):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    for path, cls in ((tiny_qwen25, Qwen2_5_VLForConditionalGeneration), (tiny_qwen3, Qwen3VLForConditionalGeneration)):
        model = cls.from_pretrained(path, dtype=torch.bfloat16).eval()
        pixels, grid = _images(AutoProcessor.from_pretrained(path), [_noise(), _textured()])
        with torch.no_grad():
            stock = model.model.get_image_features(pixels.to(torch.bfloat16), grid)
        tokens = _encoder(model)(pixels.to(torch.bfloat16), grid)
        for merged, features in zip(tokens, stock.pooler_output):
            assert merged.embeds.dtype == torch.bfloat16
            torch.testing.assert_close(merged.embeds[merged.mapping], features, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("lengths", [[5, 3, 7, 1], [4, 4, 4]], ids=["ragged", "uniform"])
@pytest.mark.parametrize("weighted", [True, False], ids=["sizes", "no-sizes"])
def test_segment_attention_matches_the_softmax_written_out(lengths, weighted):
    """Each segment attends within itself, a key of size s weighing log(s) more (ragged segments take the
    per-segment path on CPU, uniform ones the batched path)."""
    torch.manual_seed(0)
    rows, heads, width, scale = sum(lengths), 2, 8, 0.3
    q, k, v = (torch.randn(rows, heads, width, dtype=torch.float64) for _ in range(3))
    sizes = torch.randint(1, 6, (rows,)).double() if weighted else None
    out = qwen_vl._segment_attention(q, k, v, sizes, lengths, scale)
    start = 0
    for n in lengths:
        keys = range(start, start + n)
        for i in keys:
            for h in range(heads):
                logits = torch.tensor([scale * float(q[i, h] @ k[j, h])
                                       + (float(sizes[j].log()) if weighted else 0.0) for j in keys])
                weights = logits.softmax(0)
                expected = sum(float(weights[m]) * v[j, h] for m, j in enumerate(keys))
                torch.testing.assert_close(out[i, h], expected, rtol=1e-6, atol=1e-6)
        start += n
