"""Checks a command runs on its arguments before anything heavy starts (Ray, Redis, a model's weights).

Each raises ``DymuError`` with one line naming the problem, which the CLI prints before exiting with 2. They
are cheap: at most a checkpoint's config.json and a thresholds file are read. What the typed config can check
on its own (``dymu.config.OPTION_CHECKS``) is checked there, for the YAML files and the Python API as well;
what is here needs the command line (options that are not config) or the machine (the device, a path).
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from dymu.errors import DymuError
from dymu.files import check_cache_dir

if TYPE_CHECKING:
    from dymu.config import VideoQAConfig

def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and v >= low


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# Command-line options that are not part of the config, by their argparse dest: (test, what a valid value is).
# An option a command does not have, or that was not given (None), is skipped.
ARG_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "decoders": (_int_at_least(1), "an integer >= 1"),
    "model_worker_cpus": (_positive, "a number of CPUs > 0"),
    "batch_size": (_int_at_least(1), "an integer >= 1"),
    "frames_per_video": (_int_at_least(1), "an integer >= 1"),
    "max_results": (_int_at_least(1), "an integer >= 1"),
    "token_budget": (_int_at_least(1), "an integer >= 1"),
    "sample_fps": (_positive, "a number > 0"),
    "redis_maxlen": (_int_at_least(1), "an integer >= 1"),
}


def check_args(args: argparse.Namespace) -> None:
    """Every ``ARG_CHECKS`` option the command line has and gave."""
    for dest, (valid, what) in ARG_CHECKS.items():
        value = getattr(args, dest, None)
        if value is not None and not valid(value):
            raise DymuError(f"--{dest.replace('_', '-')} must be {what}, got {value!r}")


def check_text(text: str | None, what: str) -> None:
    """A question or prompt that was given must say something."""
    if text is not None and not text.strip():
        raise DymuError(f"the {what} is empty")


def reject_url(text: str, command: str) -> None:
    """``ask`` and ``caption`` read local files; a URL would otherwise be reported as a mangled missing file."""
    from dymu.frames import is_url

    if is_url(text):
        raise DymuError(f"{text}: URLs are not accepted by `dymu-video {command}`; download the file first "
                        f"(`dymu-video serve` takes URLs)")


def check_writable(path: str | Path, what: str = "--out") -> Path:
    """Raise unless ``path`` can be written: an existing file we can open for appending, or a new name in a
    folder we can create files in (missing folders on the way are made later). Nothing is changed or left
    behind: the probes open the file to append nothing, or make and drop an unnamed temp file. Trying beats
    ``os.access``, which says yes to root on read-only or virtual file systems."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DymuError(f"{what} {path} is a folder, not a file")
    try:
        if path.exists():
            with open(path, "ab"):
                pass
            return path
        folder = path.absolute().parent
        while not folder.exists():  # the nearest folder that exists decides whether the missing ones can be made
            folder = folder.parent
        if not folder.is_dir():
            raise DymuError(f"{what} {path} cannot be written: {folder} is a file, not a folder")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise DymuError(f"{what} {path} cannot be written ({exc.strerror or exc})") from None
    return path


def check_thresholds_out(path: str | Path, overwrite: bool) -> Path:
    """``calibrate --out``: a new file, or an earlier thresholds file when ``overwrite``. Any other file there
    (a video named by mistake, a FIFO) is refused and left as it is, --overwrite or not."""
    from dymu.thresholds import is_thresholds_file

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        if not is_thresholds_file(path):
            raise DymuError(f"--out {path} exists and is not a thresholds file; refusing to replace it "
                            f"(name a new file)")
        if not overwrite:
            raise DymuError(f"--out {path} already holds thresholds; pass --overwrite to replace them")
    return check_writable(path)


def check_media_paths(paths: Iterable[str]) -> None:
    """Each path a folder, or a file that reading media accepts (``dymu.frames.existing_file``: there, a regular
    file, readable), found before a model loads. A FIFO or a device is refused without being opened: opening
    one blocks until a writer comes, or reads forever."""
    from dymu.frames import existing_file

    for name in paths:
        if not Path(name).expanduser().is_dir():
            existing_file(Path(name).expanduser())


def is_local_run(ray_address: str | None) -> bool:
    """Whether the model runs on this machine (no Ray cluster named, or a Ray started here: ``local``), so that
    its device can be checked here."""
    address = ray_address or os.environ.get("DYMU_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
    return not address or address == "local"


def has_cuda_driver() -> bool:
    """Whether NVIDIA's driver library loads. Without it torch sees no GPU; finding that out through torch takes
    seconds of imports and a CUDA probe, this takes milliseconds."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def check_model(model: str, revision: str | None = None, device: str | None = None,
                thresholds: str | None = None, keep: float | None = None) -> Any:
    """The checkpoint's config, after checking what can be told without its weights: that it is a family dymu
    supports, that ``device`` exists here (None: not checked, e.g. the model runs on a cluster), that a ``keep``
    fits in a frame and that a ``thresholds`` file is sound and made for this encoder."""
    from dymu.thresholds import EncoderFingerprint, Thresholds

    if thresholds is not None:  # a file that is unsound on its own fails before torch and transformers load
        Thresholds.load(thresholds)
    from dymu.checkpoint import local_config

    if device is not None and device not in ("auto", "cpu"):  # every machine has a CPU; the rest asks torch
        if device.startswith("cuda") and not has_cuda_driver():
            raise DymuError(f"device {device!r} asked for, but this machine has no CUDA GPU (no NVIDIA driver: "
                            f"libcuda does not load); use --device cpu (or auto)")
        from dymu.families import check_device

        check_device(device)
    # A local folder's config.json is read as plain JSON (no torch: a fraction of a second); a hub id, or a
    # config that leaves a field the checks need at its default, is read through transformers.
    config = local_config(model) if revision is None else None
    try:
        if config is not None and not config.model_type.startswith("qwen"):
            config.vision_config.model_type, config.vision_feature_layer  # noqa: B018 (absent: a default applies)
        fingerprint = EncoderFingerprint.from_model_config(config) if config is not None else None
    except (AttributeError, TypeError, ValueError):
        config = None
    if config is None:
        from dymu.families import checkpoint_config

        config = checkpoint_config(model, revision)
        fingerprint = EncoderFingerprint.from_model_config(config)
    if keep is not None and fingerprint is not None:
        positions = (fingerprint.image_size // fingerprint.patch_size) ** 2 + (fingerprint.family == "clip")
        if keep >= positions:  # as calibration will say: keeping every token is no merging at all
            raise DymuError(f"--keep {keep:g}: a frame of {model} has {positions} visual tokens, so the tokens to "
                            f"keep must be between 1 and {positions - 1}")
    if thresholds is not None:
        Thresholds.load(thresholds, fingerprint)
    return config


def check_config(config: "VideoQAConfig", local: bool) -> Any:
    """``check_model`` for a job's config and, for a run on this machine, the cache folder its thresholds may be
    saved in; the checkpoint's config is returned."""
    if local:
        check_cache_dir()
    return check_model(config.model, config.revision, config.device if local else None,
                       config.thresholds if config.dtome else None, config.keep if config.dtome else None)
