"""Synthetic test media written with PyAV: small videos, images, an audio-only file and broken copies.

Everything is deterministic under its seed. Sizes are small (64-128 px, a few frames) so that encoding and
decoding take milliseconds; pass a size when a test needs the real model geometry.
"""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image

from pipeline.sample_media import video_codec, write_video

def textured_frame(size: int = 64, seed: int = 0) -> np.ndarray:
    """A (size, size, 3) frame with smooth blobs and edges: structure a vision encoder can tell apart."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    frame = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.int16)
    stripes = (np.arange(size)[:, None] // 8 + np.arange(size)[None, :] // 8) % 2
    frame[..., 0] += (stripes * 40).astype(np.int16)
    return np.clip(frame, 0, 255).astype(np.uint8)


def static_video(
    path: str | Path, num_frames: int = 8, size: int = 64, noise: float = 2.0, fps: float = 8.0, seed: int = 0
) -> Path:
    """The same textured frame repeated, each copy with small Gaussian sensor-like noise."""
    rng = np.random.default_rng(seed)
    base = textured_frame(size, seed).astype(np.float32)
    frames = base[None] + rng.normal(0.0, noise, size=(num_frames, *base.shape))
    return write_video(path, np.clip(frames, 0, 255).round().astype(np.uint8), fps)


def changing_video(
    path: str | Path, num_frames: int = 8, size: int = 64, fps: float = 8.0, seed: int = 0
) -> Path:
    """A different textured frame every frame (a scene cut at every frame)."""
    frames = np.stack([textured_frame(size, seed + 1000 * i) for i in range(num_frames)])
    return write_video(path, frames, fps)


def flat_video(
    path: str | Path,
    num_frames: int = 8,
    size: int = 64,
    color: tuple[int, int, int] = (90, 120, 200),
    fps: float = 8.0,
) -> Path:
    """A single flat colour, every frame."""
    frames = np.broadcast_to(np.asarray(color, dtype=np.uint8), (num_frames, size, size, 3))
    return write_video(path, frames, fps)


def counter_video(path: str | Path, num_frames: int = 24, size: int = 64, fps: float = 8.0) -> Path:
    """Frame i is flat grey level ``10 * i``: a decoded frame tells which source frame it was."""
    levels = (np.arange(num_frames) * 10 % 250).astype(np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (num_frames, size, size, 3))
    return write_video(path, frames, fps)


def empty_video(path: str | Path, size: int = 64) -> Path:
    """An mp4 container that was opened for video and closed before any frame was written."""
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(video_codec(), rate=8)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        container.start_encoding()
    return path


def textured_image(path: str | Path, size: int = 64, seed: int = 0) -> Path:
    path = Path(path)
    Image.fromarray(textured_frame(size, seed)).save(path)
    return path


def flat_image(path: str | Path, size: int = 64, color: tuple[int, int, int] = (90, 120, 200)) -> Path:
    path = Path(path)
    Image.new("RGB", (size, size), color).save(path)
    return path


def audio_only_file(path: str | Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    """An audio-only file (a 440 Hz tone; AAC in .m4a/.mp4, PCM in .wav) with no video stream."""
    path = Path(path)
    codec = "pcm_s16le" if path.suffix.lower() == ".wav" else "aac"
    samples = (np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate) * 8000).astype(np.int16)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        # Each encoder wants its own sample format (AAC: planar float), so convert on the way in.
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=rate)
        chunk = stream.codec_context.frame_size or 1024
        for start in range(0, len(samples), chunk):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + chunk], format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for resampled in resampler.resample(frame):
                for packet in stream.encode(resampled):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncated_copy(src: str | Path, dst: str | Path, fraction: float = 0.5) -> Path:
    """The first ``fraction`` of a file's bytes, as a download cut off half way leaves it."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst
