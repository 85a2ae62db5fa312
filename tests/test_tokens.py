"""The merged-tokens contract: validation and a safetensors round trip that rejects foreign bytes."""
from __future__ import annotations

import pytest
import torch

from dymu.tokens import InvalidTokens, MergedTokens


def _tokens(dtype=torch.float32) -> MergedTokens:
    # Two frames of 4 positions; row 0 stands for positions in both frames (a temporal merge).
    mapping = torch.tensor([0, 0, 1, 2, 0, 3, 3, 4])
    return MergedTokens(
        embeds=torch.randn(5, 8).to(dtype),
        sizes=torch.bincount(mapping),
        mapping=mapping,
        positions_per_frame=[4, 4],
        timestamps=[0.0, 0.5],
        config_hash="abc",
        meta={"model": "tiny", "preset": "mid"},
    ).validate()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact(dtype):
    tokens = _tokens(dtype)
    back = MergedTokens.from_bytes(tokens.to_bytes())
    assert back.embeds.dtype == dtype and torch.equal(back.embeds, tokens.embeds)
    assert torch.equal(back.mapping, tokens.mapping) and torch.equal(back.sizes, tokens.sizes)
    assert back.positions_per_frame == [4, 4] and back.timestamps == [0.0, 0.5]
    assert back.config_hash == "abc" and back.meta == {"model": "tiny", "preset": "mid"}


def test_rows_per_frame_counts_a_shared_row_once():
    assert _tokens().rows_per_frame() == [3, 2]
    assert _tokens().frame_of_position().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "data",
    [b"", b"not safetensors at all", b"\x10\x00\x00\x00\x00\x00\x00\x00{}"],
)
def test_garbage_bytes_are_rejected(data):
    with pytest.raises(InvalidTokens):
        MergedTokens.from_bytes(data)


def test_other_schema_and_truncation_are_rejected():
    good = _tokens().to_bytes()
    with pytest.raises(InvalidTokens):
        MergedTokens.from_bytes(good[: len(good) // 2])
    foreign = good.replace(b'"schema":"1"', b'"schema":"9"')
    assert foreign != good
    with pytest.raises(InvalidTokens, match="schema"):
        MergedTokens.from_bytes(foreign)


def test_broken_contracts_are_caught():
    t = _tokens()
    with pytest.raises(InvalidTokens, match="sizes"):
        MergedTokens(t.embeds, t.sizes + 1, t.mapping, [4, 4]).validate()
    with pytest.raises(InvalidTokens, match="outside"):
        MergedTokens(t.embeds, t.sizes, torch.tensor([0, 0, 1, 2, 0, 3, 3, 7]), [4, 4]).validate()
    with pytest.raises(InvalidTokens, match="no position"):
        MergedTokens(torch.randn(6, 8), torch.tensor([3, 1, 1, 2, 1, 0]), t.mapping, [4, 4]).validate()
    with pytest.raises(InvalidTokens, match="positions_per_frame"):
        MergedTokens(t.embeds, t.sizes, t.mapping, [4, 3]).validate()
