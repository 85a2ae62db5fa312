"""Decoding media files: still images with Pillow, video frames with decord (PyAV when decord cannot).

A video is probed with PyAV first (the container opens and has a video stream), because decord can crash the
process on some damaged files; only then does decord read the sampled frames. If decord fails to open the file,
disagrees with the container about the frame count, or errors while reading, PyAV decodes the frames itself.
Every problem with the input raises a ``MediaError`` subclass whose one-line message names the file.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dymu.errors import DymuError


@functools.cache
def _decord():
    """decord, imported when the first video is read (checking a file's kind needs none of it), or None: it has
    no wheel for some platforms, and PyAV does everything then."""
    try:
        import decord
    except ImportError:
        return None
    if not os.environ.get("DYMU_VERBOSE"):
        # decord's FFmpeg prints "[h264 @ 0x...] error while decoding MB ..." for every damaged frame, from any
        # process (a Ray actor's lines reach the driver's terminal); our own error says it in one line. PyAV's
        # FFmpeg logging is off by default. `dymu-video -v` sets DYMU_VERBOSE and brings them back.
        decord.logging.set_level(decord.logging.QUIET)
    return decord


log = logging.getLogger(__name__)


class MediaError(DymuError):
    """A media file that cannot be used; the message names the file."""


class MediaNotFound(MediaError):
    """The path does not exist or is not a file."""


class UnsupportedMedia(MediaError):
    """The file is neither an image nor a video (or not the kind the caller asked for)."""


class CorruptMedia(MediaError):
    """The file looks like a video or image but is truncated or damaged."""


class NoVideoStream(MediaError):
    """The container opens but holds no video stream (e.g. audio only)."""


class NoFramesSampled(MediaError):
    """Sampling selected no frame: a count of zero asked for, or a video with no decodable frame."""


@dataclass
class VideoFrames:
    """Frames sampled from a video.

    frames: (T, H, W, 3) uint8 RGB.
    timestamps: seconds of each sampled frame from the start of the video.
    indices: index of each sampled frame among all the video's frames.
    """

    frames: np.ndarray
    timestamps: list[float]
    source_fps: float
    duration: float
    total_frames: int
    backend: Literal["decord", "av"]
    indices: list[int] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


# Container signatures: a file that starts like a video but does not open is a damaged video, not "not a video".
_VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".ts", ".mpg", ".mpeg", ".3gp", ".wmv"}


def _has_video_signature(head: bytes) -> bool:
    return (
        head[4:8] == b"ftyp"  # MP4 / MOV / 3GP
        or head[:4] == b"\x1a\x45\xdf\xa3"  # Matroska / WebM
        or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
        or head[:3] == b"FLV"
        or head[:4] == b"\x00\x00\x01\xba"  # MPEG program stream
    )


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(text: str | Path) -> bool:
    """``scheme://...``: what a local path never is (``Path`` would fold its ``//`` into a mangled name)."""
    return isinstance(text, str) and _URL.match(text) is not None


def regular_file(path: str | Path) -> Path:
    """``path`` if it is a local regular file, else the ``MediaNotFound`` that says why not.

    It only looks (stat), never opens: a FIFO would block the open until something writes to it, and a device
    may never end. The CLI's checks of the inputs it is named call this (or ``existing_file``) first."""
    if is_url(path):
        raise MediaNotFound(f"{path}: a URL; this reads local files only, download it first")
    path = Path(path)
    if not path.exists():
        raise MediaNotFound(f"{path}: no such file")
    if not path.is_file():
        raise MediaNotFound(f"{path}: not a regular file")
    return path


def existing_file(path: str | Path) -> Path:
    """``regular_file``, and readable: what every reader of media here calls before it opens a file."""
    path = regular_file(path)
    if not os.access(path, os.R_OK):
        raise MediaNotFound(f"{path}: not readable (permission denied)")
    return path


# Pillow refuses images over 2 * Image.MAX_IMAGE_PIXELS (a guard against decompression bombs); dymu applies
# the same limit itself, so that it can name it and say how to raise it.
MAX_PIXELS_ENV = "DYMU_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 2 * 89_478_485
_pillow_limit_lock = threading.Lock()


def max_image_pixels() -> int:
    """The largest image (width x height) read: ``$DYMU_MAX_IMAGE_PIXELS``, else Pillow's default limit."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    if not text.isdigit() or int(text) < 1:
        raise DymuError(f"{MAX_PIXELS_ENV} must be a number of pixels >= 1, got {text!r}")
    return int(text)


def _open_image(path: Path) -> Image.Image:
    """``Image.open`` (the header only: nothing is decoded yet) under dymu's pixel limit instead of Pillow's.

    Pillow reads its own limit, a module global, only while opening; it is lifted for that moment alone, under
    a lock, and put back as it was."""
    limit = max_image_pixels()
    with _pillow_limit_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    width, height = image.size
    if width * height > limit:
        image.close()
        raise UnsupportedMedia(
            f"{path}: a {width}x{height} image ({width * height / 1e6:.1f} megapixels) is over the limit of "
            f"{limit / 1e6:.1f} megapixels; set {MAX_PIXELS_ENV}={width * height} to read it"
        )
    return image


def _is_still_image(path: Path) -> bool:
    """Pillow recognises the file and it has a single frame (an animated GIF counts as a video).

    An image over the pixel limit raises ``UnsupportedMedia`` saying so."""
    try:
        with _open_image(path) as image:
            return getattr(image, "n_frames", 1) == 1
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def _open_video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    streams = [
        s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic  # cover art
    ]
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise NoVideoStream(f"{path}: no video stream (the file holds {', '.join(kinds)})")
    return streams[0]


def _open_container(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, OSError) as exc:
        with open(path, "rb") as f:
            head = f.read(16)
        if not head:
            raise CorruptMedia(f"{path}: empty file") from exc
        if _has_video_signature(head) or path.suffix.lower() in _VIDEO_SUFFIXES:
            raise CorruptMedia(f"{path}: truncated or corrupt video ({exc.__class__.__name__})") from exc
        raise UnsupportedMedia(f"{path}: neither an image nor a video") from exc


def media_kind(path: str | Path) -> Literal["image", "video"]:
    """Say whether a file is a still image or a video by probing its content (the extension is not trusted).

    Raises the ``MediaError`` that explains why it is neither.
    """
    path = existing_file(path)
    if _is_still_image(path):
        return "image"
    with _open_container(path) as container:
        _open_video_stream(container, path)
    return "video"


def is_image_path(path: str | Path) -> bool:
    try:
        return media_kind(path) == "image"
    except MediaError:
        return False


def is_video_path(path: str | Path) -> bool:
    try:
        return media_kind(path) == "video"
    except MediaError:
        return False


def load_image(path: str | Path) -> Image.Image:
    """Open a still image as RGB, upright (EXIF orientation applied)."""
    path = existing_file(path)
    try:
        with _open_image(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except UnidentifiedImageError as exc:
        if is_video_path(path):
            raise UnsupportedMedia(f"{path}: is a video, not an image") from exc
        raise UnsupportedMedia(f"{path}: neither an image nor a video") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow reports truncated data as OSError
        raise CorruptMedia(f"{path}: truncated or corrupt image ({exc})") from exc


def sample_indices(
    total_frames: int,
    source_fps: float,
    num_frames: int | None = 8,
    fps: float | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """Indices (sorted, distinct) of the frames to decode.

    With ``fps``: one frame every ``1/fps`` seconds from the start (``num_frames`` is then ignored).
    Otherwise ``num_frames`` spread evenly from the first frame to the last (all frames if ``None``; fewer when
    the video is shorter). ``max_frames`` then caps the count, thinning evenly.
    """
    if total_frames <= 0:
        return np.zeros(0, dtype=np.int64)
    if fps is not None:
        if source_fps <= 0:
            raise MediaError("cannot sample by fps: the video does not say its frame rate")
        step = 1.0 / fps
        if step * source_fps <= 1.0:  # at least one sample per frame: every frame, once
            count, pick = total_frames, _every_frame
        else:  # one sample every `step` seconds, each on a different frame
            count = math.ceil(total_frames / source_fps / step)  # as many as np.arange(0, duration, step) has

            def pick(k: np.ndarray) -> np.ndarray:
                # The frame on screen at time t is the last one that started at or before t.
                return np.minimum(np.floor(k * step * source_fps + 1e-6).astype(np.int64), total_frames - 1)
    elif num_frames is None:
        count, pick = total_frames, _every_frame
    else:
        count = min(num_frames, total_frames)
        spread = (total_frames - 1) / max(count - 1, 1)

        def pick(k: np.ndarray) -> np.ndarray:  # np.linspace(0, total_frames - 1, count)[k], rounded
            last = (k == count - 1) & (count > 1)  # linspace ends exactly on its stop
            return np.where(last, total_frames - 1, np.round(k * spread)).astype(np.int64)
    # The candidates are only counted, never listed: --fps 1e9 must not build a billion of them; only the
    # at most max_frames chosen ones (thinned evenly) are made.
    if max_frames is not None and count > max_frames:
        return pick(np.linspace(0, count - 1, max_frames).round().astype(np.int64))
    return pick(np.arange(count, dtype=np.int64))


def _every_frame(k: np.ndarray) -> np.ndarray:
    return k


def _check_sampling_args(num_frames: int | None, fps: float | None, max_frames: int | None) -> None:
    if fps is not None and not fps > 0:
        raise NoFramesSampled(f"fps must be positive, got {fps}")
    if fps is None and num_frames is not None and num_frames <= 0:
        raise NoFramesSampled(f"num_frames={num_frames}: no frames sampled")
    if max_frames is not None and max_frames <= 0:
        raise NoFramesSampled(f"max_frames={max_frames}: no frames sampled")


@dataclass
class _StreamInfo:
    fps: float
    duration: float
    start: float
    frames: int  # 0 when the container does not say


def _probe(path: Path) -> _StreamInfo:
    with _open_container(path) as container:
        stream = _open_video_stream(container, path)
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = stream.frames / fps if fps else 0.0
        return _StreamInfo(fps=fps, duration=duration, start=start, frames=int(stream.frames))


def probe_video(path: str | Path) -> tuple[int, float]:
    """(frame count, frames per second) of a video file, without decoding it (packets are counted when
    the container does not say how many frames it holds)."""
    path = existing_file(path)
    if _is_still_image(path):
        raise UnsupportedMedia(f"{path}: is an image, not a video")
    info = _probe(path)
    return info.frames or _count_packets(path), info.fps


def read_video_frames(
    path: str | Path,
    num_frames: int | None = 8,
    fps: float | None = None,
    max_frames: int | None = None,
    *,
    backend: Literal["auto", "av"] = "auto",
) -> VideoFrames:
    """Decode sampled frames of a video file (see ``sample_indices`` for how frames are chosen).

    ``backend="av"`` skips decord (for files known to upset it).
    """
    if backend not in ("auto", "av"):
        raise DymuError(f"backend must be 'auto' or 'av', got {backend!r}")
    path = existing_file(path)
    _check_sampling_args(num_frames, fps, max_frames)
    if _is_still_image(path):
        raise UnsupportedMedia(f"{path}: is an image, not a video")
    info = _probe(path)
    video = None
    if backend == "auto" and _decord() is not None:
        video = _read_with_decord(path, info, num_frames, fps, max_frames)
    if video is None:
        video = _read_with_av(path, info, num_frames, fps, max_frames)
    if video.num_frames == 0:
        raise NoFramesSampled(f"{path}: the video has no decodable frames")
    return video


def _read_with_decord(
    path: Path, info: _StreamInfo, num_frames: int | None, fps: float | None, max_frames: int | None
) -> VideoFrames | None:
    """Read with decord, or return None (after logging why) when PyAV should do it instead."""
    decord = _decord()
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        total = len(reader)
        # decord counts frames from its own index, which some files' headers contradict; trust neither then.
        if info.frames and total != info.frames:
            log.info("%s: decord counts %d frames, the container %d; decoding with PyAV", path, total, info.frames)
            return None
        source_fps = float(reader.get_avg_fps())
        indices = sample_indices(total, source_fps, num_frames, fps, max_frames)
        if len(indices) == 0:
            return None
        batch = reader.get_batch(indices.tolist())
        frames = np.asarray(batch.asnumpy() if hasattr(batch, "asnumpy") else batch, dtype=np.uint8)
        if frames.ndim != 4 or frames.shape[0] != len(indices):
            log.info("%s: decord returned %s for %d frames; decoding with PyAV", path, frames.shape, len(indices))
            return None
        timestamps = reader.get_frame_timestamp(indices.tolist())[:, 0]
    except Exception as exc:  # decord raises DECORDError, RuntimeError or worse on damaged input
        log.info("%s: decord failed (%s); decoding with PyAV", path, str(exc).splitlines()[0] if str(exc) else exc)
        return None
    return VideoFrames(
        frames=frames,
        timestamps=[max(0.0, float(t)) for t in timestamps],
        source_fps=source_fps,
        duration=info.duration,
        total_frames=total,
        backend="decord",
        indices=indices.tolist(),
    )


def _read_with_av(
    path: Path, info: _StreamInfo, num_frames: int | None, fps: float | None, max_frames: int | None
) -> VideoFrames:
    total = info.frames or _count_packets(path)
    indices = sample_indices(total, info.fps, num_frames, fps, max_frames)
    frames, timestamps, decoded = _decode_selected(path, info, indices)
    if len(frames) < len(indices):
        # The header promised more frames than the stream holds: sample again among those that exist.
        log.info("%s: header says %d frames, %d decode; resampling", path, total, decoded)
        total = decoded
        indices = sample_indices(total, info.fps, num_frames, fps, max_frames)
        frames, timestamps, _ = _decode_selected(path, info, indices)
    return VideoFrames(
        frames=np.stack(frames) if frames else np.zeros((0, 0, 0, 3), dtype=np.uint8),
        timestamps=timestamps,
        source_fps=info.fps,
        duration=info.duration,
        total_frames=total,
        backend="av",
        indices=indices.tolist(),
    )


def _count_packets(path: Path) -> int:
    """Frames in the video stream, by reading packets without decoding (for containers with no count)."""
    with _open_container(path) as container:
        stream = _open_video_stream(container, path)
        try:
            return sum(1 for packet in container.demux(stream) if packet.size)
        except av.FFmpegError as exc:
            raise CorruptMedia(f"{path}: truncated or corrupt video ({exc.__class__.__name__})") from exc


def _decode_selected(
    path: Path, info: _StreamInfo, indices: np.ndarray
) -> tuple[list[np.ndarray], list[float], int]:
    """Decode from the start, keeping the frames at ``indices``; also return how many frames were decoded."""
    wanted = set(indices.tolist())
    last = max(wanted, default=-1)
    frames: list[np.ndarray] = []
    timestamps: list[float] = []
    decoded = 0
    with _open_container(path) as container:
        stream = _open_video_stream(container, path)
        stream.thread_type = "SLICE"  # frame threading would swallow decoding errors of damaged files
        try:
            for index, frame in enumerate(container.decode(stream)):
                decoded = index + 1
                if index in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    seconds = frame.time if frame.time is not None else index / info.fps
                    timestamps.append(max(0.0, seconds - info.start))
                if index >= last:
                    break
        except av.FFmpegError as exc:
            raise CorruptMedia(
                f"{path}: truncated or corrupt video (decoding failed after frame {decoded}: {exc.__class__.__name__})"
            ) from exc
    return frames, timestamps, decoded
