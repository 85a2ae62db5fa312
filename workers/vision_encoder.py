"""``VisionEncoder``: a Ray actor (on a GPU when the cluster has one) that turns a ``Media`` into merged tokens.

It wraps ``VideoQA.encode`` (DToMe per frame, temporal merging, the projector and the model's layout). The
checkpoint is loaded once, when the actor starts; the LLM worker loads its own copy in its own process
(the price of running the two stages side by side on different jobs).
"""
from __future__ import annotations

from typing import Any

import ray
import torch

from dymu.errors import DymuError
from dymu.families import load_family
from dymu.tokens import MergedTokens
from dymu.config import VideoQAConfig
from dymu.videoqa import Media, VideoQA
from workers.metrics import pipeline_metrics


def load_videoqa(config: VideoQAConfig, threads: int | None) -> VideoQA:
    """The model of ``config`` in this process; ``threads`` caps torch's CPU threads (None: leave as is)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a worker's log is no terminal
    if threads:
        torch.set_num_threads(threads)
    return VideoQA(load_family(config.model, config.device, config.dtype, config.revision), config)


class VisionEncoder:
    """Media -> ``MergedTokens`` (LLM-space rows, on the CPU so that any worker can take them)."""

    def __init__(self, config: VideoQAConfig, threads: int | None = None):
        self.qa = load_videoqa(config, threads)

    def cache_settings(self, media: Media | None = None) -> dict[str, Any] | None:
        """What, besides the video and the model, decides this encoder's tokens: the config's encoder
        options, the DToMe thresholds in use and the weights' dtype. None while the thresholds are unknown.

        Thresholds the model has none of yet are calibrated on ``media`` (as ``VideoQA`` does on the first
        video); without media that case returns None.
        """
        try:
            visual = self.qa.visual_tokenizer(media)
        except DymuError:
            if media is not None:
                raise
            return None
        dtype = next(self.qa.family.model.parameters()).dtype
        return {"encoder": self.qa.config.encoder_fingerprint(), "taus": visual.taus, "dtype": str(dtype)}

    @ray.method(num_returns=2)
    def encode(self, media: Media) -> tuple[dict[str, Any], MergedTokens]:
        """(summary, tokens): the caller fetches the small summary and passes the tokens on by reference."""
        tokens = self.qa.encode(media).to("cpu")
        stages, seconds = tokens.meta["stages"], tokens.meta["seconds"]
        model = self.qa.config.model
        metrics = pipeline_metrics()
        metrics.tokens_before.inc(stages["llm_positions"], tags={"model": model})
        metrics.tokens_after.inc(stages["llm_rows"], tags={"model": model})
        metrics.stage(model, "encode", seconds["encode"] + seconds["layout"])
        summary = {"positions": tokens.num_positions, "rows": tokens.num_unique, "seconds": dict(seconds)}
        return summary, tokens
