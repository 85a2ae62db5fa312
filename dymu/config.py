"""One typed config that drives the CLI, YAML files and the Python API alike.

Values are resolved in this order, each overriding the one before: the dataclass defaults, the named preset
(``configs/presets.yaml``), a YAML file the user passes, then explicit arguments (CLI flags or keyword
arguments). ``None`` in the last layer means "not given".
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dymu.errors import DymuError
from dymu.files import parse_yaml
from dymu.llm.config import GenerateConfig, PruneConfig
from dymu.presets import MERGE_ORDERS, preset_keep

DEFAULT_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
PRESETS = ("off", "low", "mid", "high")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")  # as dymu.engine.attention.BACKENDS (that module imports torch)


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or a finite float (YAML's ``.nan`` and ``--top-p nan`` are not numbers here)."""
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= low


def _number_in(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
    def valid(v: Any) -> bool:
        return (_is_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high))
    return valid


def _or_none(valid: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or valid(v)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


# A nested section's values (prune) by their annotated type; their own __post_init__ checks the ranges.
TYPE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a number"),
    "str | None": (_or_none(_is_text), "a string"),
}

# Every option's test and, for the message, what a valid value is: "<option> must be <what>, got <value>".
# The CLI, YAML files and the Python API all end here, so a bad value fails before anything starts.
OPTION_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (_is_text, "a Hugging Face model id or a checkpoint folder"),
    "revision": (_or_none(_is_text), "a branch, tag or commit"),
    "preset": (lambda v: v in PRESETS, "one of " + ", ".join(PRESETS)),
    "device": (lambda v: isinstance(v, str) and DEVICE_PATTERN.fullmatch(v) is not None,
               "auto, cpu, cuda, cuda:N or mps"),
    "dtype": (lambda v: v in DTYPES, "one of auto, float32, bfloat16, float16"),
    "num_frames": (_int_at_least(1), "an integer >= 1"),
    "fps": (_or_none(_number_in(0, math.inf, low_open=True)), "a number > 0"),
    "max_frames": (_int_at_least(1), "an integer >= 1"),
    "dtome": (lambda v: isinstance(v, bool), "true or false"),
    "keep_fraction": (_or_none(_number_in(0, 1, low_open=True, high_open=True)), "a number in (0, 1)"),
    "keep": (_or_none(_int_at_least(1)), "an integer >= 1"),
    "thresholds": (_or_none(_is_text), "the path of a thresholds file"),
    "temporal_threshold": (_number_in(-1, 1), "a cosine in [-1, 1] (1.0 turns temporal merging off)"),
    "reuse_threshold": (_number_in(0, math.inf), "a number >= 0 (0 = off)"),
    "vtu": (lambda v: isinstance(v, bool), "true or false"),
    "max_new_tokens": (_int_at_least(1), "an integer >= 1"),
    "temperature": (_number_in(0, math.inf), "a number >= 0 (0 = greedy)"),
    "top_p": (_number_in(0, 1, low_open=True), "a number in (0, 1]"),
    "seed": (_or_none(_is_int), "an integer"),
    "merge_order": (lambda v: v in MERGE_ORDERS, "one of " + ", ".join(MERGE_ORDERS)),
    "max_batch": (_int_at_least(1), "an integer >= 1 (1 = one answer at a time)"),
    "encode_batch_frames": (_int_at_least(1), "an integer >= 1 (frames per vision-encoder batch)"),
    "kv_cache_gb": (_or_none(_number_in(0, math.inf, low_open=True)), "> 0 (GiB)"),
    "prefix_cache_gb": (_number_in(0, math.inf), ">= 0 (GiB; 0 = off)"),
    "attention_backend": (lambda v: v in ATTENTION_BACKENDS, "one of " + ", ".join(ATTENTION_BACKENDS)),
}


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
    merge_order: how DToMe arranges the tokens after each merge, which decides the next layer's pairs:
        "positional" (default: tokens stay in patch order) or "authors" (DyMU's own code: unmerged tokens by
        descending similarity, then the others), for thresholds calibrated with the authors' code.
    temporal_threshold: cosine above which a token merges with the previous frame's; >= 1.0 turns it off.
    reuse_threshold: a frame none of whose patches changed by more than this since the last encoded frame
        (mean absolute difference of normalised pixels over a patch) reuses its encoder output; 0 = off.
    vtu: every merged position keeps its own RoPE index (virtual unmerging); False = merged rows at
        consecutive positions.
    max_new_tokens / temperature / top_p: the answer; temperature 0 = greedy.
    prune: progressive pruning of visual KV entries while decoding.
    max_batch: answers the LLM writes at once (continuous batching; 1 = one after another).
    encode_batch_frames: frames the vision encoder runs in one batch, from one video or from several queued
        ones (the encoder worker batches the videos waiting for it up to this many frames; a longer video
        goes alone, in chunks of this many).
    kv_cache_gb: the LLM's paged KV pool; None = 40% of the free GPU memory on CUDA, 2 GiB on CPU.
    prefix_cache_gb: how much of that pool may keep visual prefixes (prompt up to the end of the video)
        for later questions about the same video; 0 = off.
    attention_backend: the engine's decode attention over its paged KV pool: "sdpa" (gathered entries, one
        SDPA call), "flex" (FlexAttention on the pool with a block mask) or "auto" (flex on CUDA when
        available, else sdpa).
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
    merge_order: str = "positional"
    temporal_threshold: float = 0.9
    reuse_threshold: float = 0.0
    vtu: bool = True
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    prune: PruneConfig = field(default_factory=PruneConfig)
    max_batch: int = 1
    encode_batch_frames: int = 16
    kv_cache_gb: float | None = None
    prefix_cache_gb: float = 0.5
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.thresholds, Path):
            self.thresholds = str(self.thresholds)
        if isinstance(self.prune, Mapping):
            known = [f.name for f in dataclasses.fields(PruneConfig)]
            unknown = sorted(set(self.prune) - set(known))
            if unknown:
                raise DymuError(f"unknown prune option(s): {', '.join(map(str, unknown))}; known: {', '.join(known)}")
            for f in dataclasses.fields(PruneConfig):  # types here; PruneConfig checks the ranges
                valid, what = TYPE_CHECKS.get(str(f.type), (lambda v: True, ""))
                if f.name in self.prune and not valid(self.prune[f.name]):
                    raise DymuError(f"prune.{f.name} must be {what}, got {self.prune[f.name]!r}")
            self.prune = PruneConfig(**self.prune)
        elif not isinstance(self.prune, PruneConfig):
            raise DymuError(f"prune must be a mapping of pruning options (enabled, layer, min_keep, ...), "
                            f"got {self.prune!r}")
        for name in OPTION_CHECKS:
            check_option(name, getattr(self, name))

    def tokens_to_keep(self, positions_per_frame: int) -> int:
        """DToMe's calibration target: average tokens kept per frame of ``positions_per_frame``."""
        if self.keep is not None:
            if self.keep >= positions_per_frame:
                raise DymuError(f"keep is {self.keep}, but a frame has {positions_per_frame} visual tokens: keep "
                                f"must be between 1 and {positions_per_frame - 1}")
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
                "thresholds", "merge_order", "temporal_threshold", "reuse_threshold", "dtype")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_option(name: str, value: Any, flag: str | None = None) -> None:
    """One option against ``OPTION_CHECKS``, for commands that take it outside a config (``flag`` names it)."""
    valid, what = OPTION_CHECKS[name]
    if not valid(value):
        raise DymuError(f"{flag or name} must be {what}, got {value!r}")


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
            file_values = parse_yaml(path.read_text(), f"config file {path}") or {}
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
