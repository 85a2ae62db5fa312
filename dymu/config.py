"""One typed config that drives the CLI, YAML files and the Python API alike.

Values are resolved in this order, each overriding the one before: the dataclass defaults, the named preset
(``configs/presets.yaml``), a YAML file the user passes, then explicit arguments (CLI flags or keyword
arguments). ``None`` in the last layer means "not given".
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dymu.calibrate import preset_keep
from dymu.errors import DymuError
from dymu.llm.config import GenerateConfig, PruneConfig

DEFAULT_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
PRESETS = ("off", "low", "mid", "high")


@dataclass
class VideoQAConfig:
    """Everything that decides what a video question costs and what it answers.

    model / revision: a Hugging Face checkpoint id or a local folder.
    device / dtype: "auto" = CUDA + bf16 when a GPU is present, else CPU + fp32.
    num_frames / fps / max_frames: frames sampled uniformly (num_frames) or at a rate (fps, capped).
    dtome: merge similar tokens inside the vision encoder; keep_fraction is the calibrated average share of
        patch tokens kept per frame (None: the preset's share), ``keep`` the same as an absolute count.
    thresholds: a thresholds JSON from `dymu-video calibrate`; None = the bundled or cached file for this
        model and preset, calibrated on the first video's frames when there is none.
    temporal_threshold: cosine above which a token merges with the previous frame's; >= 1.0 turns it off.
    reuse_threshold: a frame none of whose patches changed by more than this since the last encoded frame
        (mean absolute difference of normalised pixels over a patch) reuses its encoder output; 0 = off.
    vtu: every merged position keeps its own RoPE index (virtual unmerging); False = merged rows at
        consecutive positions.
    max_new_tokens / temperature / top_p: the answer; temperature 0 = greedy.
    prune: progressive pruning of visual KV entries while decoding.
    max_batch: answers the LLM writes at once (continuous batching; 1 = one after another).
    kv_cache_gb: the LLM's paged KV pool; None = 40% of the free GPU memory on CUDA, 2 GiB on CPU.
    prefix_cache_gb: how much of that pool may keep visual prefixes (prompt up to the end of the video)
        for later questions about the same video; 0 = off.
    """

    model: str = DEFAULT_MODEL
    revision: str | None = None
    preset: str = "mid"
    device: str = "auto"
    dtype: str = "auto"
    num_frames: int = 8
    fps: float | None = None
    max_frames: int = 64
    dtome: bool = True
    keep_fraction: float | None = None
    keep: int | None = None
    thresholds: str | None = None
    temporal_threshold: float = 0.9
    reuse_threshold: float = 0.0
    vtu: bool = True
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    prune: PruneConfig = field(default_factory=PruneConfig)
    max_batch: int = 1
    kv_cache_gb: float | None = None
    prefix_cache_gb: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.prune, dict):
            self.prune = PruneConfig(**self.prune)
        if self.preset not in PRESETS:
            raise DymuError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.num_frames is not None and self.num_frames < 1 and self.fps is None:
            raise DymuError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.fps is not None and self.fps <= 0:
            raise DymuError(f"fps must be > 0, got {self.fps}")
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction < 1.0:
            raise DymuError(f"keep_fraction must be in (0, 1), got {self.keep_fraction}")
        if self.keep is not None and self.keep < 1:
            raise DymuError(f"keep must be >= 1, got {self.keep}")
        if self.temperature < 0:
            raise DymuError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_batch < 1:
            raise DymuError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise DymuError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.prefix_cache_gb < 0:
            raise DymuError(f"prefix_cache_gb must be >= 0, got {self.prefix_cache_gb}")

    def tokens_to_keep(self, positions_per_frame: int) -> int:
        """DToMe's calibration target: average tokens kept per frame of ``positions_per_frame``."""
        if self.keep is not None:
            return self.keep
        if self.keep_fraction is not None:
            return max(1, round(self.keep_fraction * positions_per_frame))
        return preset_keep(self.preset if self.preset != "off" else "high", positions_per_frame)

    def generate_config(self, num_layers: int, eos_token_ids: tuple[int, ...] | None = None) -> GenerateConfig:
        """The LLM-side options; the pruning layer is moved up on models too shallow for it."""
        prune = self.prune
        if prune.enabled and prune.layer > num_layers - 2:
            prune = dataclasses.replace(prune, layer=max(num_layers - 2, 0))
        return GenerateConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.temperature > 0,
            temperature=self.temperature if self.temperature > 0 else 1.0,
            top_p=self.top_p,
            seed=self.seed,
            eos_token_ids=eos_token_ids,
            prefill="vtu" if self.vtu else "no_vtu",
            prune=prune,
        )

    def encoder_fingerprint(self) -> str:
        """A short hash of every option that changes the visual tokens (for caches and reports)."""
        keys = ("model", "revision", "num_frames", "fps", "max_frames", "dtome", "keep_fraction", "keep",
                "thresholds", "temporal_threshold", "reuse_threshold", "dtype")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_presets() -> dict[str, dict[str, Any]]:
    text = resources.files("configs").joinpath("presets.yaml").read_text()
    return yaml.safe_load(text)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def make_config(preset: str | None = None, config_file: str | Path | None = None, **overrides: Any) -> VideoQAConfig:
    """Build a config: defaults, then ``preset``, then ``config_file`` (YAML), then non-None ``overrides``.

    A preset named in the YAML file is used when no ``preset`` argument is given.
    """
    file_values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise DymuError(f"config file {path} does not exist")
        try:
            file_values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DymuError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(file_values, dict):
            raise DymuError(f"config file {path} must hold a mapping of options")
    preset = preset or file_values.get("preset") or VideoQAConfig.preset
    presets = load_presets()
    if preset not in presets:
        raise DymuError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    values: dict[str, Any] = {"prune": dataclasses.asdict(PruneConfig())}
    values = _merge(values, presets[preset])
    values = _merge(values, file_values)
    values = _merge(values, {k: v for k, v in overrides.items() if v is not None})
    values["preset"] = preset
    known = {f.name for f in dataclasses.fields(VideoQAConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DymuError(f"unknown config option(s): {', '.join(unknown)}")
    try:
        return VideoQAConfig(**values)
    except TypeError as exc:
        raise DymuError(f"bad config: {exc}") from exc
