"""The terminal is ours: FFmpeg's decoder lines and Ray's notices stay off it unless asked for (-v)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from media import changing_video

ROOT = Path(__file__).resolve().parents[1]


def noisy_copy(src: Path, dst: Path) -> Path:
    """A copy with damaged bytes in the middle: the container opens, the h264 decoder complains per frame."""
    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(0)
    for i in range(int(len(data) * 0.3), int(len(data) * 0.9), 97):
        data[i] = int(rng.integers(0, 256))
    dst.write_bytes(bytes(data))
    return dst


def python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)


def test_ffmpeg_decoder_lines_stay_off_the_terminal(tmp_path):
    noisy = noisy_copy(changing_video(tmp_path / "good.mp4", num_frames=30, size=128, seed=1), tmp_path / "noisy.mp4")
    code = ("import sys\nfrom dymu.frames import read_video_frames\n"
            f"try:\n    read_video_frames({str(noisy)!r}, num_frames=8)\n"
            "except Exception as exc:\n    print(exc)\n")
    quiet = python(code, {k: v for k, v in os.environ.items() if k != "DYMU_VERBOSE"})
    assert "corrupt" in quiet.stdout  # our own one line says what is wrong...
    assert "@ 0x" not in quiet.stderr, quiet.stderr[:500]  # ...and FFmpeg's per-frame lines are gone
    loud = python(code, {**os.environ, "DYMU_VERBOSE": "1"})
    assert "@ 0x" in loud.stderr  # -v: they are back (so the test above can fail)


def test_a_local_ray_prints_no_token_notice(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    run = python("import logging\nlogging.basicConfig(level=logging.WARNING)\n"
                 "from pipeline.runtime import connect_ray\nimport ray\n"
                 "assert connect_ray(None)\nray.shutdown()\n", env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Token authentication" not in run.stderr, run.stderr[-2000:]


def test_transformers_progress_bars_stay_off_the_terminal(tiny_ov):
    # The CLI quiets transformers before importing it (through the variables it reads on import), so that a bad
    # option fails without that import; a checkpoint load must still print no "Loading weights" bar.
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    load = ("from transformers import AutoModelForImageTextToText\n"
            f"AutoModelForImageTextToText.from_pretrained({str(tiny_ov)!r})\n")
    quiet = python("from pipeline.cli import _quiet_libraries\n_quiet_libraries(0)\n" + load, env)
    assert quiet.returncode == 0 and "Loading weights" not in quiet.stderr, quiet.stderr[-2000:]
    loud = python("from pipeline.cli import _quiet_libraries\n_quiet_libraries(1)\n" + load, env)
    assert "Loading weights" in loud.stderr  # -v: the bar is back (so the test above can fail)
