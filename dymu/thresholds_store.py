"""Where a model's DToMe thresholds come from when a job needs them.

In order: a file the user named; a file bundled in ``configs/thresholds/``; one cached by an earlier run
in the user's cache folder; and, when there is none, thresholds calibrated on the first frames this job
sees (a running mean over batches, as `dymu-video calibrate` does), saved to the cache so the next run
reuses them. That last case is logged as a warning: those thresholds fit one video, not a data set, and
`dymu-video calibrate` on a representative set is better.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from importlib import resources
from pathlib import Path

import torch

from dymu.calibrate import calibrate
from dymu.files import cache_dir
from dymu.thresholds import EncoderFingerprint, Thresholds
from dymu.vision.encoder import DToMeEncoder

log = logging.getLogger(__name__)


def _file_name(model_id: str, fingerprint: EncoderFingerprint, keep: int, merge_order: str = "positional") -> str:
    digest = hashlib.sha256(json.dumps([model_id, asdict(fingerprint)], sort_keys=True).encode()).hexdigest()[:12]
    stem = Path(model_id.rstrip("/")).name or "model"
    order = "" if merge_order == "positional" else f"-{merge_order}"  # thresholds depend on the merge order
    return f"{stem}-{digest}-keep{keep}{order}.json"


def merge_order_of(thresholds: Thresholds) -> str:
    """The merge order thresholds were calibrated with (files from before the option: positional)."""
    return str(thresholds.calibration.get("merge_order", "positional"))


def find_thresholds(
    model_id: str, encoder: DToMeEncoder, keep: int, explicit: str | Path | None = None
) -> Thresholds | None:
    """The thresholds to use for ``model_id`` at ``keep`` tokens per frame, or None if there are none yet."""
    fingerprint = EncoderFingerprint.of(encoder)
    if explicit is not None:
        thresholds = Thresholds.load(explicit, fingerprint, model_id)
        if merge_order_of(thresholds) != encoder.merge_order:
            log.warning("%s was calibrated with the %s merge order and is applied with the %s one; token counts "
                        "will differ from its calibration", explicit, merge_order_of(thresholds), encoder.merge_order)
        return thresholds
    name = _file_name(model_id, fingerprint, keep, encoder.merge_order)
    bundled = resources.files("configs").joinpath("thresholds", name)
    if bundled.is_file():
        return Thresholds.from_json(json.loads(bundled.read_text())).check(fingerprint, model_id)
    cached = cache_dir() / "thresholds" / name
    if cached.is_file():
        log.info("using thresholds cached at %s", cached)
        return Thresholds.load(cached, fingerprint, model_id)
    return None


def calibrate_and_cache(
    model_id: str, encoder: DToMeEncoder, keep: int, pixels: torch.Tensor, source: str, batch_size: int = 8
) -> Thresholds:
    """Calibrate on ``pixels`` (the job's own first frames), save to the cache and return the thresholds."""
    path = cache_dir() / "thresholds" / _file_name(model_id, EncoderFingerprint.of(encoder), keep, encoder.merge_order)
    log.warning(
        "no DToMe thresholds calibrated for %s at %d tokens per frame yet: calibrating on the %d frames of %s "
        "(saved to %s; run `dymu-video calibrate` on representative data for better ones)",
        model_id, keep, len(pixels), source, path,
    )
    batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
    taus = calibrate(encoder, batches, keep)
    thresholds = Thresholds(
        taus=taus,
        model_id=model_id,
        encoder=EncoderFingerprint.of(encoder),
        target_keep=float(keep),
        calibration={"data": [source], "frames": len(pixels), "batch_size": batch_size, "auto": True,
                     "merge_order": encoder.merge_order},
    )
    thresholds.save(path)
    return thresholds
