"""Shared test fixtures: tiny random-weight checkpoints saved to a temp folder and loaded back through
transformers' own from_pretrained, exactly as a user's checkpoint would be. Nothing reaches a hub."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A real redis-server per test session (fixture `redis_server`); no mocks for the cache.
pytest_plugins = ["tests.redis_fixture"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory) -> None:
    """Thresholds calibrated during tests go to a temp folder, never to the user's cache."""
    os.environ["DYMU_CACHE"] = str(tmp_path_factory.mktemp("dymu-cache"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting one takes seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


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


@pytest.fixture(scope="session")
def tiny_qwen25(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL checkpoint (14px patches, 112px windows, full attention in block 3 of 4, Qwen2)."""
    from dymu.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen25"), family="qwen2.5-vl", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """A tiny Qwen3-VL checkpoint (16px patches, DeepStack after ViT blocks 1 and 2, Qwen3)."""
    from dymu.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"), family="qwen3-vl", seed=0)
