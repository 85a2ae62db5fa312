"""Bad input to the CLI, run as a user runs it (`dymu-video ...` in a subprocess): one line naming the problem
on stderr, exit code 2, no traceback, and found before Ray, Redis or a model start.

"Before start-up" is checked two ways. Redis points at a port nothing listens on, so that a check that came
too late would end in the runtime's "unreachable" error instead of its own message. And each run must take
far less than a start-up: less than a few times what `dymu-video ask --help` takes on this machine now (the
Python, torch and CLI imports every run pays), with a floor of 10 s for a loaded CI machine; starting Ray and
loading a model takes 25-35 s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from media import static_video

CLI = str(Path(sys.executable).with_name("dymu-video"))
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DYMU_RAY_ADDRESS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", REDIS_URL=UNREACHABLE_REDIS, DYMU_CACHE=str(tmp))
    env.pop("DYMU_MAX_IMAGE_PIXELS", None)
    return env


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    # The timeout also ends a run that blocks on a FIFO it should have refused, so no test can hang.
    done = subprocess.run([CLI, *argv], cwd=cwd, env={**_env(cwd / "cache"), **(env or {})}, capture_output=True,
                          text=True, timeout=120)
    return done, time.perf_counter() - started


@pytest.fixture(scope="module")
def files(tiny_ov, tmp_path_factory) -> Path:
    """A folder with everything the bad invocations name, by short relative names; ``tiny`` is a good model."""
    from PIL import Image

    from dymu.thresholds import EncoderFingerprint, Thresholds
    from dymu.vision.load import load_vision_model

    root = tmp_path_factory.mktemp("bad-input")
    (root / "tiny").symlink_to(tiny_ov)
    static_video(root / "clip.mp4", num_frames=4, size=64)
    Image.new("1", (16000, 12000)).save(root / "huge.png")  # 192 Mpx, a small file (1 bit per pixel)
    (root / "a-file").write_text("not a folder\n")
    (root / "no-model-type").mkdir()
    config = json.loads((tiny_ov / "config.json").read_text())
    config.pop("model_type")
    (root / "no-model-type" / "config.json").write_text(json.dumps(config))
    (root / "prune5.yaml").write_text("prune: 5\n")
    (root / "lots.yaml").write_text("max_new_tokens: lots\n")
    (root / "corrupt.json").write_text('{"format": "dymu-thresh')

    fingerprint = EncoderFingerprint.of(load_vision_model(str(tiny_ov), "cpu", "float32").encoder())
    good = Thresholds(taus=[0.9] * fingerprint.num_layers, model_id="tiny", encoder=fingerprint,
                      target_keep=250.0, achieved_mean=260.0, achieved_std=9.0).to_json()

    def thresholds(name: str, change) -> None:
        data = json.loads(json.dumps(good))
        change(data)
        (root / name).write_text(json.dumps(data))  # json.dumps writes float("nan") as NaN, as Python reads it

    os.mkfifo(root / "fifo.mp4")  # opening it blocks until a writer comes: it must be refused unopened
    (root / "with-fifo").mkdir()
    os.mkfifo(root / "with-fifo" / "only.mp4")
    (root / "fifo-list.txt").write_text("fifo.mp4\n")
    (root / "no-config").mkdir()
    (root / "no-weights").mkdir()
    (root / "no-weights" / "config.json").write_text((tiny_ov / "config.json").read_text())
    (root / "not-empty").mkdir()
    (root / "not-empty" / "config.json").write_text('{"a real checkpoint": "given by mistake"}\n')
    deep = "[" * 100_000 + "]" * 100_000
    (root / "deep.json").write_text(deep)
    (root / "deep.yaml").write_text(f"prune: {deep}\n")
    (root / "deep-model").mkdir()
    (root / "deep-model" / "config.json").write_text(json.dumps(config)[:-1] + f', "extra": {deep}}}')
    (root / "deep-model" / "model.safetensors").symlink_to(tiny_ov / "model.safetensors")
    (root / "good.json").write_text(json.dumps(good))
    thresholds("achieved-null.json", lambda d: d.update(achieved=None))
    thresholds("nan-tau.json", lambda d: d["taus"].__setitem__(1, float("nan")))
    thresholds("tau-5.json", lambda d: d["taus"].__setitem__(0, 5.0))
    thresholds("clip-family.json", lambda d: d["model"].update(family="clip"))
    return root


ASK = ["ask", "clip.mp4", "What happens?", "--model", "tiny"]

CASES = {
    # argv, what the one line must say
    "device-cuda-without-gpu": (ASK + ["--device", "cuda"], "no CUDA GPU"),
    "device-cuda-99": (ASK + ["--device", "cuda:99"], "CUDA GPU"),
    "device-banana": (ASK + ["--device", "banana"], "device must be auto, cpu, cuda"),
    "dtype-banana": (ASK + ["--dtype", "banana"], "dtype must be one of"),
    "model-worker-cpus-negative": (ASK + ["--model-worker-cpus", "-1"], "--model-worker-cpus must be"),
    "decoders-0": (ASK + ["--decoders", "0"], "--decoders must be an integer >= 1"),
    "ask-model-without-model-type": (["ask", "clip.mp4", "q", "--model", "no-model-type"], '"model_type"'),
    "stream-model-without-model-type": (["stream", "clip.mp4", "--prompt", "q", "--model", "no-model-type"],
                                        '"model_type"'),
    "thresholds-achieved-null": (ASK + ["--thresholds", "achieved-null.json"], '"achieved" must be a mapping'),
    "thresholds-nan-tau": (ASK + ["--thresholds", "nan-tau.json"], "cosines in [-1, 1]"),
    "thresholds-tau-5": (ASK + ["--thresholds", "tau-5.json"], "cosines in [-1, 1]"),
    "thresholds-missing": (ASK + ["--thresholds", "missing.json"], "no such thresholds file"),
    "thresholds-corrupt": (ASK + ["--thresholds", "corrupt.json"], "not a JSON thresholds file"),
    "thresholds-wrong-family": (ASK + ["--thresholds", "clip-family.json"], "family clip (file) vs siglip"),
    "tokens-thresholds-wrong-family": (["tokens", "--model", "tiny", "--thresholds", "clip-family.json",
                                        "clip.mp4"], "family clip (file) vs siglip"),
    "config-prune-5": (ASK + ["--config", "prune5.yaml"], "prune must be a mapping"),
    "config-max-new-tokens-lots": (ASK + ["--config", "lots.yaml"], "max_new_tokens must be an integer"),
    "huge-png": (["ask", "huge.png", "q", "--model", "tiny"], "16000x12000"),
    "calibrate-out-unwritable": (["calibrate", "--model", "tiny", "--data", "clip.mp4", "--preset", "mid",
                                  "--out", "a-file/thresholds.json"], "--out a-file/thresholds.json cannot be"),
    "stream-out-unwritable": (["stream", "clip.mp4", "--prompt", "q", "--model", "tiny", "--out", "a-file/r.jsonl"],
                              "--out a-file/r.jsonl cannot be written"),
    "temporal-threshold-minus-5": (ASK + ["--temporal-threshold", "-5"], "temporal_threshold must be a cosine"),
    "empty-question": (["ask", "clip.mp4", " ", "--model", "tiny"], "the question is empty"),
    "caption-empty-prompt": (["caption", "clip.mp4", "--out", "c.jsonl", "--prompt", "", "--model", "tiny"],
                             "the --prompt is empty"),
    "max-frames-0": (ASK + ["--max-frames", "0"], "max_frames must be an integer >= 1"),
    "max-new-tokens-0": (ASK + ["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    "top-p-2": (ASK + ["--top-p", "2"], "top_p must be a number in (0, 1]"),
    "keep-100000": (ASK + ["--keep", "100000"], "--keep 100000: a frame of tiny has 729 visual tokens"),
    "calibrate-out-a-video": (["calibrate", "--model", "tiny", "--data", "clip.mp4", "--preset", "mid",
                               "--out", "clip.mp4"], "--out clip.mp4 exists and is not a thresholds file"),
    "calibrate-out-a-video-overwrite": (["calibrate", "--model", "tiny", "--data", "clip.mp4", "--preset", "mid",
                                         "--out", "clip.mp4", "--overwrite"], "is not a thresholds file"),
    "calibrate-out-thresholds": (["calibrate", "--model", "tiny", "--data", "clip.mp4", "--preset", "mid",
                                  "--out", "good.json"], "--out good.json already holds thresholds; pass --overwrite"),
    "calibrate-out-fifo": (["calibrate", "--model", "tiny", "--data", "clip.mp4", "--preset", "mid",
                            "--out", "fifo.mp4", "--overwrite"], "--out fifo.mp4 exists and is not a thresholds"),
    "make-tiny-model-into-a-file": (["make-tiny-model", "a-file"], "a-file is a file, not a folder"),
    "make-tiny-model-under-a-file": (["make-tiny-model", "a-file/m"], "a-file is a file, not a folder"),
    "make-tiny-model-not-empty": (["make-tiny-model", "not-empty"], "not-empty is not empty; pass --overwrite"),
    "caption-fifo": (["caption", "fifo.mp4", "--out", "c.jsonl", "--model", "tiny"], "fifo.mp4: not a regular file"),
    "caption-fifo-in-list": (["caption", "@fifo-list.txt", "--out", "c.jsonl", "--model", "tiny"],
                             "fifo.mp4: not a regular file"),
    "caption-fifo-as-list": (["caption", "@fifo.mp4", "--out", "c.jsonl", "--model", "tiny"],
                             "cannot read the list file: "),
    "caption-folder-of-a-fifo": (["caption", "with-fifo", "--out", "c.jsonl", "--model", "tiny"],
                                 "no video or image files found"),
    "tokens-fifo": (["tokens", "--model", "tiny", "--thresholds", "good.json", "fifo.mp4"],
                    "fifo.mp4: not a regular file"),
    "calibrate-data-fifo": (["calibrate", "--model", "tiny", "--data", "fifo.mp4", "--preset", "mid",
                             "--out", "new.json"], "fifo.mp4: not a regular file"),
    "model-without-weights": (["ask", "clip.mp4", "q", "--model", "no-weights"],
                              "no-weights: the folder has a config.json but no weights"),
    "tokens-model-without-weights": (["tokens", "--model", "no-weights", "--thresholds", "good.json", "clip.mp4"],
                                     "no-weights: the folder has a config.json but no weights"),
    "model-without-config": (["ask", "clip.mp4", "q", "--model", "no-config"],
                             "no-config: the folder has no config.json"),
    "dymu-cache-a-file": (ASK, "DYMU_CACHE a-file is a file, not a folder"),
    "caption-dymu-cache-under-a-file": (["caption", "clip.mp4", "--out", "c.jsonl", "--model", "tiny"],
                                        "DYMU_CACHE a-file/cache cannot be made: "),
    "serve-dymu-cache-a-file": (["serve", "--model", "tiny"], "DYMU_CACHE a-file is a file, not a folder"),
    "demo-dymu-cache-a-file": (["demo"], "DYMU_CACHE a-file is a file, not a folder"),
    "thresholds-deeply-nested": (ASK + ["--thresholds", "deep.json"], "deep.json nests lists or mappings more than"),
    "config-deeply-nested": (ASK + ["--config", "deep.yaml"], "config file deep.yaml nests lists or mappings"),
    "model-config-deeply-nested": (["ask", "clip.mp4", "q", "--model", "deep-model"],
                                   "deep-model: config.json nests lists or mappings more than"),
    "ask-url": (["ask", "http://127.0.0.1:8000/clip.mp4", "q", "--model", "tiny"],
                "http://127.0.0.1:8000/clip.mp4: URLs are not accepted by `dymu-video ask`"),
    "caption-url": (["caption", "https://example.com/a.mp4", "--out", "c.jsonl", "--model", "tiny"],
                    "https://example.com/a.mp4: URLs are not accepted by `dymu-video caption`"),
}
# Environment variables a case sets, over _env's.
CASE_ENV = {"dymu-cache-a-file": {"DYMU_CACHE": "a-file"}, "serve-dymu-cache-a-file": {"DYMU_CACHE": "a-file"},
            "demo-dymu-cache-a-file": {"DYMU_CACHE": "a-file"},
            "caption-dymu-cache-under-a-file": {"DYMU_CACHE": "a-file/cache"}}
# Files of the user's that cases name, which must be left byte for byte (and unwritten: same mtime).
UNTOUCHED = ["clip.mp4", "good.json", "a-file", "not-empty/config.json"]




@pytest.fixture(scope="module")
def time_limit(files) -> float:
    """Seconds a bad invocation may take: what any run pays for its imports on this machine now (`ask --help`),
    times a margin, and at least 10 s."""
    done, seconds = _run(["ask", "--help"], files)
    assert done.returncode == 0
    return max(10.0, 6 * seconds)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_before_start_up(case, files, time_limit):
    if case == "device-cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    argv, message = CASES[case]
    before = {name: ((files / name).read_bytes(), (files / name).stat().st_mtime_ns) for name in UNTOUCHED}
    done, seconds = _run(argv, files, CASE_ENV.get(case))
    lines = done.stderr.strip().splitlines()
    print(f"{case}: {seconds:.1f}s (limit {time_limit:.1f}s): {done.stderr.strip()}")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"dymu-video {argv[0]}: error: ") and message in lines[0]
    assert seconds < time_limit
    assert not (files / "c.jsonl").exists()  # caption refused before it opened --out
    assert not (files / "new.json").exists()
    for name, (data, mtime) in before.items():
        assert (files / name).read_bytes() == data and (files / name).stat().st_mtime_ns == mtime, name
    assert sorted(p.name for p in (files / "not-empty").iterdir()) == ["config.json"]


# Every case but the CUDA ones is found from the command line, the config, the files named and a local
# checkpoint's config.json (read as plain JSON): neither torch (~1.7 s) nor transformers (~0.6 s) is imported
# before the one line. The CUDA cases ask torch about the device where NVIDIA's driver is installed.
NEEDS_NO_TORCH = [
    *(["device-cuda-without-gpu", "device-cuda-99"] if not torch.cuda.is_available() else []),
    "ask-model-without-model-type", "stream-model-without-model-type", "thresholds-wrong-family",
    "tokens-thresholds-wrong-family", "keep-100000", "device-banana", "dtype-banana", "model-worker-cpus-negative", "decoders-0", "thresholds-achieved-null",
    "thresholds-nan-tau", "thresholds-tau-5", "thresholds-missing", "thresholds-corrupt", "config-prune-5",
    "config-max-new-tokens-lots", "huge-png", "calibrate-out-unwritable", "stream-out-unwritable",
    "temporal-threshold-minus-5", "empty-question", "caption-empty-prompt", "max-frames-0", "max-new-tokens-0",
    "top-p-2", "ask-url", "caption-url", "calibrate-out-a-video", "calibrate-out-a-video-overwrite",
    "calibrate-out-thresholds", "calibrate-out-fifo", "make-tiny-model-into-a-file", "make-tiny-model-under-a-file",
    "make-tiny-model-not-empty", "caption-fifo", "caption-fifo-in-list", "caption-fifo-as-list",
    "caption-folder-of-a-fifo", "tokens-fifo", "calibrate-data-fifo",
    "model-without-weights", "tokens-model-without-weights", "model-without-config", "dymu-cache-a-file",
    "caption-dymu-cache-under-a-file", "serve-dymu-cache-a-file", "demo-dymu-cache-a-file",
    "thresholds-deeply-nested", "config-deeply-nested", "model-config-deeply-nested",
]
_MAIN_THEN_MODULES = (
    "import json, sys\n"
    "from pipeline.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(json.dumps({'code': code, 'imported': [m for m in ('torch', 'transformers') if m in sys.modules]}))\n"
)


@pytest.mark.parametrize("case", NEEDS_NO_TORCH)
def test_bad_input_fails_before_torch_or_transformers_is_imported(case, files):
    argv, message = CASES[case]
    done = subprocess.run([sys.executable, "-c", _MAIN_THEN_MODULES, *argv], cwd=files,
                          env={**_env(files / "cache"), **CASE_ENV.get(case, {})}, capture_output=True, text=True,
                          timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 2 and message in done.stderr, done.stderr
    assert result["imported"] == [], f"{case} imported {result['imported']} before its error: {done.stderr}"
