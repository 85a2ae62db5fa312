"""Shared test fixtures: tiny random-weight checkpoints saved to a temp folder and loaded back through
transformers' own from_pretrained, exactly as a user's checkpoint would be. Nothing reaches a hub."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_ov(tmp_path_factory) -> Path:
    """A tiny LLaVA-OneVision checkpoint (SigLIP 384px/14 = 729 patches, Qwen2 decoder)."""
    from dymu.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ov"), family="llava-onevision", seed=0)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """A tiny LLaVA-1.5 checkpoint (CLIP 336px/14 = 576 patches + CLS, Llama decoder)."""
    from dymu.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llava"), family="llava", seed=0)
