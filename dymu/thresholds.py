"""Per-layer DToMe thresholds: one small, versioned JSON file per (model, preset).

The file says which encoder it was made for (family, depth, feature layer, geometry, width), so that
thresholds are never applied to a model they do not fit, and how it was made (target, calibration data,
the token counts it achieved there), so that a user can tell what it will cost.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dymu.checkpoint import TOWER_FAMILIES, layers_to_run
from dymu.errors import DymuError
from dymu.files import parse_json, write_text_atomic

if TYPE_CHECKING:
    from dymu.vision.encoder import DToMeEncoder

log = logging.getLogger(__name__)

FORMAT = "dymu-thresholds"
VERSION = 1
# Taus are cosines; calibration records real edge scores, which rounding (bf16 on a GPU: ~0.004) can put a
# hair outside [-1, 1]. Such a file is sound; a tau of 5 or NaN is not.
TAU_SLACK = 0.01


def _is_real(value: Any) -> bool:
    """A finite int or float (JSON's NaN and Infinity are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ThresholdsError(DymuError):
    """A thresholds file that cannot be read, or that was made for another encoder."""


# Far above a real thresholds file (a few KB: one number per layer and a short record of the calibration).
_MAX_THRESHOLDS_BYTES = 1 << 20


def is_thresholds_file(path: str | Path) -> bool:
    """Whether ``path`` is a regular file holding a dymu thresholds file (any version, sound or not): the one
    kind of file ``calibrate --out`` may replace. Nothing else is read past its size."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > _MAX_THRESHOLDS_BYTES:
            return False
        data = parse_json(path.read_bytes(), str(path))
    except (OSError, ValueError, DymuError):  # ValueError: json.JSONDecodeError and UnicodeDecodeError
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


@dataclass(frozen=True)
class EncoderFingerprint:
    """What must match between the encoder a file was calibrated on and the one it is applied to."""

    family: str
    num_layers: int
    feature_layer: int
    image_size: int
    patch_size: int
    hidden_size: int

    @classmethod
    def of(cls, encoder: DToMeEncoder) -> "EncoderFingerprint":
        if hasattr(encoder, "fingerprint"):  # encoders without a fixed input size say it themselves (Qwen-VL)
            return encoder.fingerprint()
        config = encoder.tower.config
        return cls(
            family=encoder.family,
            num_layers=len(encoder.parts.layers),
            feature_layer=encoder.feature_layer,
            image_size=int(config.image_size),
            patch_size=int(config.patch_size),
            hidden_size=int(config.hidden_size),
        )

    @classmethod
    def from_model_config(cls, config: Any) -> "EncoderFingerprint | None":
        """The fingerprint read off a checkpoint's config alone (no weights), or None when the config does not
        tell it (a vision tower DToMe has no adapter for, a list of feature layers)."""
        vision = getattr(config, "vision_config", None)
        family = TOWER_FAMILIES.get(getattr(vision, "model_type", None))
        feature_layer = getattr(config, "vision_feature_layer", None)
        if family is None or not isinstance(feature_layer, int):
            return None
        return cls(family=family, num_layers=int(vision.num_hidden_layers), feature_layer=feature_layer,
                   image_size=int(vision.image_size), patch_size=int(vision.patch_size),
                   hidden_size=int(vision.hidden_size))

    def differences(self, other: "EncoderFingerprint") -> list[str]:
        mine, theirs = asdict(self), asdict(other)
        return [f"{key} {mine[key]} (file) vs {theirs[key]} (model)" for key in mine if mine[key] != theirs[key]]


@dataclass
class Thresholds:
    """Per-layer taus for the layers an encoder runs, with where they came from.

    calibration: what they were calibrated on (``data`` paths, ``images``, ``videos``, ``frames_per_video``,
    ``samples``, ``batch_size``). achieved_mean/std: tokens per sample with these taus on that data.
    """

    taus: list[float]
    model_id: str
    encoder: EncoderFingerprint
    target_keep: float
    preset: str | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    achieved_mean: float | None = None
    achieved_std: float | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def check(self, fingerprint: EncoderFingerprint, model_id: str | None = None) -> "Thresholds":
        """Raise ``ThresholdsError`` unless these thresholds fit an encoder with ``fingerprint``."""
        differences = self.encoder.differences(fingerprint)
        if differences:
            raise ThresholdsError(
                f"thresholds made for {self.model_id} do not fit this model: " + "; ".join(differences)
            )
        if model_id is not None and model_id != self.model_id:
            log.warning(
                "thresholds were calibrated on %s, applying them to %s (same encoder shape)", self.model_id, model_id
            )
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": {"id": self.model_id, **asdict(self.encoder)},
            "preset": self.preset,
            "target_keep": self.target_keep,
            "taus": self.taus,
            "calibration": self.calibration,
            "achieved": {"mean": self.achieved_mean, "std": self.achieved_std},
            "created": self.created,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Thresholds":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ThresholdsError("not a dymu thresholds file")
        if data.get("version") != VERSION:
            raise ThresholdsError(f"thresholds file version {data.get('version')!r}, this dymu reads version {VERSION}")
        model = data.get("model")
        achieved = data.get("achieved", {})
        if not isinstance(model, dict) or "id" not in model:
            raise ThresholdsError("malformed thresholds file: \"model\" must be a mapping with an \"id\"")
        if not isinstance(achieved, dict):
            raise ThresholdsError(f"malformed thresholds file: \"achieved\" must be a mapping of mean and std, "
                                  f"got {achieved!r}")
        taus = data.get("taus")
        if not isinstance(taus, list) or not all(_is_real(t) and abs(t) <= 1.0 + TAU_SLACK for t in taus):
            raise ThresholdsError(f"malformed thresholds file: \"taus\" must be a list of cosines in [-1, 1], "
                                  f"got {taus!r}")
        for name, value in (("target_keep", data.get("target_keep")), ("achieved.mean", achieved.get("mean")),
                            ("achieved.std", achieved.get("std"))):
            if (value is not None or name == "target_keep") and not (_is_real(value) and value >= 0):
                raise ThresholdsError(f"malformed thresholds file: {name} must be a number >= 0, got {value!r}")
        try:
            model = dict(model)
            model_id = str(model.pop("id"))
            encoder = EncoderFingerprint(**model)
            for name, value in asdict(encoder).items():
                if not isinstance(value, str if name == "family" else int) or isinstance(value, bool):
                    raise ValueError(f"model.{name} is {value!r}")
            thresholds = cls(
                taus=[float(t) for t in taus],
                model_id=model_id,
                encoder=encoder,
                target_keep=float(data["target_keep"]),
                preset=data.get("preset"),
                calibration=dict(data.get("calibration") or {}),
                achieved_mean=achieved.get("mean"),
                achieved_std=achieved.get("std"),
                created=str(data.get("created", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ThresholdsError(f"malformed thresholds file ({exc.__class__.__name__}: {exc})") from exc
        expected = layers_to_run(encoder.feature_layer, encoder.num_layers)
        if len(thresholds.taus) != expected:
            raise ThresholdsError(f"{len(thresholds.taus)} thresholds for an encoder that runs {expected} layers")
        return thresholds

    def save(self, path: str | Path) -> Path:
        """Write the file whole (a temp file renamed over ``path``): never half a thresholds file."""
        return write_text_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(
        cls, path: str | Path, fingerprint: EncoderFingerprint | None = None, model_id: str | None = None
    ) -> "Thresholds":
        """Read a thresholds file; with ``fingerprint``, also check that it fits that encoder."""
        path = Path(path)
        if not path.is_file():
            raise ThresholdsError(f"{path}: no such thresholds file")
        try:
            data = parse_json(path.read_text(), f"{path}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ThresholdsError(f"{path}: not a JSON thresholds file ({exc})") from exc
        try:
            thresholds = cls.from_json(data)
        except ThresholdsError as exc:
            raise ThresholdsError(f"{path}: {exc}") from exc
        if fingerprint is not None:
            try:
                thresholds.check(fingerprint, model_id)
            except ThresholdsError as exc:
                raise ThresholdsError(f"{path}: {exc}") from exc
        return thresholds
