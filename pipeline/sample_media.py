"""Writing synthetic videos with PyAV: the demo's sample clip, benchmark inputs and test media."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

# libx264 is in PyAV's bundled FFmpeg; mpeg4 is the fallback for builds without it.
_VIDEO_CODECS = ("libx264", "mpeg4")


def video_codec() -> str:
    for name in _VIDEO_CODECS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # PyAV raises UnknownCodecError (or ValueError in older releases)
            continue
    raise RuntimeError(f"PyAV's FFmpeg has none of the video encoders {_VIDEO_CODECS}")


def write_video(path: str | Path, frames: np.ndarray, fps: float = 8.0, faststart: bool = False) -> Path:
    """Encode uint8 frames (T, H, W, 3) as an mp4 (H.264, yuv420p, so H and W must be even), whatever the suffix.

    ``faststart`` puts the index (moov) before the data, as streaming sites do; by default it comes last.
    """
    path = Path(path)
    frames = np.asarray(frames, dtype=np.uint8)
    _, h, w, _ = frames.shape
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", format="mp4", options=options) as container:
        stream = container.add_stream(video_codec(), rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # Near-lossless, so that what was written is what the decoder reads back (noise included).
        if stream.codec_context.name == "libx264":
            stream.options = {"crf": "1", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def scene_frames(num_frames: int = 32, size: int = 128, moving_share: float = 0.25, seed: int = 0) -> np.ndarray:
    """A mostly static camera view: a textured room, with a bright box crossing it in the middle
    ``moving_share`` of the frames, and a little sensor noise on every frame."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    room = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    frames = np.repeat(room[None], num_frames, axis=0)
    moving = max(1, round(moving_share * num_frames))
    start = (num_frames - moving) // 2
    box = size // 5
    for i in range(moving):
        x = int((size - box) * i / max(moving - 1, 1))
        frames[start + i, size // 3 : size // 3 + box, x : x + box] = (240.0, 60.0, 40.0)
    frames += rng.normal(0.0, 1.5, size=frames.shape)
    return np.clip(frames, 0, 255).round().astype(np.uint8)


def write_scene_video(path: str | Path, num_frames: int = 32, size: int = 128, fps: float = 8.0, seed: int = 0) -> Path:
    """The demo clip: ``scene_frames`` written as an mp4."""
    return write_video(path, scene_frames(num_frames, size, seed=seed), fps)
