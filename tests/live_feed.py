"""A live camera feed for tests: a synthetic view (a room, a box crossing it) sent as MPEG-TS over loopback UDP
in real time. Run as ``python -m tests.live_feed PORT SECONDS``; it imports no model code, so it starts fast."""
from __future__ import annotations

import sys
import time
from fractions import Fraction

import av

from pipeline.sample_media import scene_frames

FPS, SIZE = 10, 128


def send_feed(port: int, seconds: float) -> None:
    """Send to udp://127.0.0.1:port for ``seconds``, one frame every 1/FPS s."""
    frames = scene_frames(num_frames=4 * FPS, size=SIZE, moving_share=0.5)
    with av.open(f"udp://127.0.0.1:{port}?pkt_size=1316", "w", format="mpegts") as out:
        stream = out.add_stream("mpeg2video", rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = FPS // 2  # a reader that joins late decodes within half a second
        started = time.monotonic()
        for index in range(int(seconds * FPS)):
            frame = av.VideoFrame.from_ndarray(frames[index % len(frames)], format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, FPS)
            for packet in stream.encode(frame):
                out.mux(packet)
            time.sleep(max(0.0, started + (index + 1) / FPS - time.monotonic()))


if __name__ == "__main__":
    send_feed(int(sys.argv[1]), float(sys.argv[2]))
