"""`dymu-video caption`: inputs, the crash-safe JSON-lines file, a bad video in a folder, a run killed
mid-batch and resumed, Redis unreachable at the start and Redis going away mid-batch."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dymu.errors import DymuError
from media import changing_video, static_video, truncated_copy
from pipeline.cli import main
from pipeline.inputs import expand_inputs
from pipeline.jsonl import JsonlFile
from workers.redis_server import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def tiny_args(model: Path) -> list[str]:
    return ["--model", str(model), "--frames", "2", "--max-new-tokens", "4", "--no-progress"]


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Three good videos in nested folders, one truncated (corrupt) video and a file that is not media."""
    root = tmp_path_factory.mktemp("archive")
    (root / "day1" / "cam2").mkdir(parents=True)
    good = [changing_video(root / "day1" / "a.mp4", num_frames=4, size=64, seed=1),
            static_video(root / "day1" / "cam2" / "b.mp4", num_frames=4, size=64, seed=2),
            changing_video(root / "c.mp4", num_frames=4, size=64, seed=3)]
    bad = truncated_copy(good[0], root / "day1" / "broken.mp4", 0.3)
    (root / "notes.txt").write_text("not a video")
    return root, [p.resolve() for p in good], bad.resolve()


def spawn_caption(args: list[str]) -> subprocess.Popen:
    """`dymu-video caption` in a process of its own, as a user (or a crash) would run it."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "caption", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"caption exited early ({process.returncode}): {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no {count} line(s) in {path} after {timeout_s} s")


# --- inputs and the results file (no Ray) ---------------------------------------------------------------
def test_inputs_folders_globs_and_list_files(archive, tmp_path, monkeypatch):
    root, good, bad = archive
    everything = sorted(good + [bad])
    assert sorted(expand_inputs([str(root)])) == everything  # recursive, media names only
    monkeypatch.chdir(root)
    assert expand_inputs(["day1/**/*.mp4"]) == sorted([good[0], good[1], bad])
    listing = root / "day1" / "list.txt"
    listing.write_text("# first the camera\ncam2/b.mp4\n\n../c.mp4\ncam2/b.mp4\n")
    assert expand_inputs([f"@{listing}", str(good[2])]) == [good[1], good[2]]  # relative to the list, once each
    with pytest.raises(DymuError, match="no video or image files"):
        expand_inputs([str(tmp_path)])


def _expand_within(inputs: list[str], seconds: float = 30):
    """expand_inputs in a thread, so that one that opens a FIFO (and blocks) fails the test instead of hanging
    it: (files, None) or (None, the error)."""
    import threading

    outcome: dict = {}

    def expand() -> None:
        try:
            outcome["files"] = expand_inputs(inputs)
        except DymuError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=expand, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"expand_inputs({inputs}) blocked: it opened a FIFO"
    return outcome.get("files"), outcome.get("error")


def test_fifos_are_skipped_in_folders_and_globs_and_refused_when_named(tmp_path, monkeypatch):
    import os

    (tmp_path / "clips").mkdir()
    video = static_video(tmp_path / "clips" / "a.mp4", num_frames=2, size=32).resolve()
    os.mkfifo(tmp_path / "clips" / "pipe.mp4")
    (tmp_path / "named.txt").write_text("clips/pipe.mp4\n")
    os.mkfifo(tmp_path / "pipe-list.txt")
    monkeypatch.chdir(tmp_path)
    assert _expand_within(["clips"]) == ([video], None)
    assert _expand_within(["clips/*.mp4"]) == ([video], None)
    for named in (["clips/pipe.mp4"], ["clips", "@named.txt"]):
        files, error = _expand_within(named)
        assert files is None and str(error) == f"{tmp_path}/clips/pipe.mp4: not a regular file"
    files, error = _expand_within(["@pipe-list.txt"])
    assert files is None and "cannot read the list file: " in str(error) and "not a regular file" in str(error)


def test_the_decoder_refuses_a_fifo_before_hashing_it(tiny_ov, tmp_path):
    """A file that became a FIFO after the CLI's checks (or a job from the Python API) is a job's error, not a
    worker blocked for ever on reading it for the cache key."""
    import os
    import threading

    from dymu.config import VideoQAConfig
    from dymu.frames import MediaNotFound
    from workers.frame_decoder import FrameDecoder

    os.mkfifo(tmp_path / "pipe.mp4")
    decoder = FrameDecoder(VideoQAConfig(model=str(tiny_ov)))
    outcome: list = []

    def hash_it() -> None:
        outcome.append(_raised(decoder.content_hash, str(tmp_path / "pipe.mp4")))

    thread = threading.Thread(target=hash_it, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "content_hash opened the FIFO and blocked"
    assert isinstance(outcome[0], MediaNotFound) and str(outcome[0]).endswith("pipe.mp4: not a regular file")


def _raised(function, *args):
    try:
        function(*args)
    except Exception as exc:  # noqa: BLE001 (the test looks at which)
        return exc
    return None


def test_results_file_drops_a_partial_line_and_never_appends_by_accident(tmp_path):
    out = tmp_path / "out.jsonl"
    with JsonlFile.open(out, "new") as results:
        results.append({"path": "/a", "caption": "x"})
        results.append({"path": "/b", "error": "bad"})
    with open(out, "ab") as f:
        f.write(b'{"path": "/c", "capt')  # what a crash in the middle of a write leaves
    with pytest.raises(DymuError, match="--resume"):
        JsonlFile.open(out, "new")
    with JsonlFile.open(out, "resume") as results:
        assert [r["path"] for r in results.records] == ["/a", "/b"]
        assert out.read_bytes().endswith(b'"bad"}\n')  # the half line is gone
        with pytest.raises(DymuError, match="another process"):
            JsonlFile.open(out, "resume")
        results.rewrite([r for r in results.records if "error" not in r])
        results.append({"path": "/b", "caption": "y"})
    assert [r["path"] for r in read_records(out)] == ["/a", "/b"]
    JsonlFile.open(out, "overwrite").close()
    assert out.read_bytes() == b""


@pytest.mark.parametrize("content", [b"\x00\x00\x00\x18ftypmp42 not our jsonl\nmore bytes without a newline",
                                     b"a text file\nits last line\n", b"a text file\nits last line",
                                     b'{"path": "/a"}\n[1, 2]\n', b'{"path": "/a"}\n{"no": "path"}\n',
                                     b'{"path": "/a"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n"])
@pytest.mark.parametrize("mode", ["new", "resume", "overwrite"])
def test_results_file_that_is_not_ours_is_left_byte_for_byte(tmp_path, content, mode):
    out = tmp_path / "out.mp4"
    out.write_bytes(content)
    with pytest.raises(DymuError, match="not a dymu-video results file"):
        JsonlFile.open(out, mode)
    assert out.read_bytes() == content


def test_refused_results_file_is_left_byte_for_byte(tmp_path):
    out = tmp_path / "out.jsonl"
    content = b'{"path": "/a", "caption": "x"}\n{"path": "/b", "capt'  # ours, with a torn last line
    out.write_bytes(content)
    with pytest.raises(DymuError, match="--resume"):
        JsonlFile.open(out, "new")
    assert out.read_bytes() == content  # the torn line goes only when the file is resumed


def test_resume_counts_the_failures_already_in_the_file(tiny_ov, archive, tmp_path, capsys):
    root, good, bad = archive
    out = tmp_path / "captions.jsonl"
    with JsonlFile.open(out, "new") as results:
        results.append({"path": str(good[0]), "caption": "x"})
        results.append({"path": str(bad), "error": f"{bad}: corrupt video"})
    rc = main(["caption", str(good[0]), str(bad), "--out", str(out), "--resume", "--cache", "off",
               *tiny_args(tiny_ov)])
    captured = capsys.readouterr().out
    assert rc == 1  # nothing ran, but not every video has a caption
    assert "2 already there" in captured and "1 video(s) had already failed" in captured
    assert f"{bad}: corrupt video" in captured and "--retry-failed" in captured


WRITER = """
import sys
from pipeline.jsonl import JsonlFile

with JsonlFile.open(sys.argv[1], "resume") as out:
    n = len(out.records)
    while True:
        n += 1
        out.append({"path": f"/clip{n:06d}.mp4", "caption": "x" * int(sys.argv[2])})
"""


def test_a_writer_killed_in_the_middle_of_a_record_loses_that_record_only(tmp_path):
    """A real process appending big records (each one write of several MB, then fsync) is SIGKILLed while
    the file ends inside a record; opening the file again keeps every whole record and drops the torn one."""
    out = tmp_path / "out.jsonl"
    caption_chars = 8 << 20
    record = len(json.dumps({"path": "/clip000001.mp4", "caption": "x" * caption_chars}).encode()) + 1
    for _ in range(20):  # each try: kill the writer the moment the file ends inside a record
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(caption_chars)], cwd=ROOT)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline and writer.poll() is None:
                size = out.stat().st_size if out.exists() else 0
                if size > record and size % record:
                    writer.kill()
                    break
        finally:
            writer.kill()
            writer.wait()
        if out.stat().st_size % record:
            break  # the kill landed in the middle of a record
    data = out.read_bytes()
    whole = len(data) // record
    assert len(data) % record, "the writer was never caught in the middle of a record"
    with JsonlFile.open(out, "resume") as results:
        assert [r["path"] for r in results.records] == [f"/clip{i:06d}.mp4" for i in range(1, whole + 1)]
        assert all(len(r["caption"]) == caption_chars for r in results.records)
    assert out.read_bytes() == data[:whole * record]  # the torn record is gone, the rest byte for byte


# --- whole batches -------------------------------------------------------------------------------------
def test_redis_unreachable_at_start_is_one_clear_line(tiny_ov, archive, tmp_path, capsys):
    root, _, _ = archive
    rc = main(["caption", str(root), "--out", str(tmp_path / "c.jsonl"), "--redis-url", DEAD_REDIS, *tiny_args(tiny_ov)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "unreachable" in err and "--cache off" in err


def test_folder_with_a_corrupt_video(ray_local, tiny_ov, archive, tmp_path, capsys):
    root, good, bad = archive
    out = tmp_path / "captions.jsonl"
    # --cache off: the dead Redis URL is not even tried.
    args = [str(root), "--out", str(out), "--redis-url", DEAD_REDIS, "--cache", "off", *tiny_args(tiny_ov)]
    rc = main(["caption", *args[:-1]])  # with the progress bar
    captured = capsys.readouterr()
    assert rc == 1  # some failed
    records = {r["path"]: r for r in read_records(out)}
    assert set(records) == {str(p) for p in good + [bad]}
    for path in good:
        record = records[str(path)]
        assert record["caption"] and record["frames"] == 2 and record["cache"] == "off"
        assert record["tokens"]["llm_visual_rows"] < record["tokens"]["llm_visual_positions"]
        assert record["seconds"]["wall"] > 0
    assert "corrupt" in records[str(bad)]["error"]
    assert "captioned 3 of 4" in captured.out and "1 failed" in captured.out and str(bad) in captured.out
    assert "video/s" in captured.err or "s/video" in captured.err  # the progress bar's rate

    before = out.read_bytes()
    assert main(["caption", *args]) == 2  # no --resume: refused, nothing appended
    assert "--resume" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["caption", *args, "--resume"]) == 1  # everything is there already, one of them failed
    assert "1 video(s) had already failed" in capsys.readouterr().out and out.read_bytes() == before
    assert main(["caption", *args, "--resume", "--retry-failed"]) == 1  # the broken video, once more
    records = read_records(out)
    assert sorted(r["path"] for r in records) == sorted(str(p) for p in good + [bad])


def test_killed_mid_batch_then_resumed(ray_local, redis_server, tiny_ov, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    clips = [changing_video(folder / f"{i:02d}.mp4", num_frames=4, size=64, seed=100 + i) for i in range(8)]
    out = tmp_path / "captions.jsonl"
    args = [str(folder), "--out", str(out), "--ray-address", ray_local.get_runtime_context().gcs_address,
            "--redis-url", redis_server.url, *tiny_args(tiny_ov)]
    process = spawn_caption(args)
    wait_for_lines(out, 1, process)
    process.kill()
    process.wait()
    written = out.read_bytes()
    assert 1 <= written.count(b"\n") < len(clips)  # killed mid-batch

    assert main(["caption", *args, "--resume"]) == 0
    text = out.read_bytes()
    assert text.startswith(written)  # what was written before the crash is kept as it was
    paths = [r["path"] for r in read_records(out)]
    assert sorted(paths) == sorted(str(p.resolve()) for p in clips)  # every video once: none lost, none twice


def wait_for_held_write(client, process: subprocess.Popen, timeout_s: float = 180) -> None:
    """Until Redis holds a client's command (a cache write, under CLIENT PAUSE WRITE): a job is in its cache step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.info("clients")["blocked_clients"] >= 1:
            return
        if process.poll() is not None:
            pytest.fail(f"caption exited early ({process.returncode}): {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no cache write reached Redis after {timeout_s} s")


def test_redis_going_away_mid_batch(ray_local, tiny_ov, tmp_path):
    import redis

    folder = tmp_path / "clips"
    folder.mkdir()
    clips = [changing_video(folder / f"{i:02d}.mp4", num_frames=4, size=64, seed=200 + i) for i in range(12)]
    out = tmp_path / "captions.jsonl"
    with EmbeddedRedis(maxmemory="64mb") as server:
        # Reads (the start's PING, the lookups) are served, every write is held: no job can get past its
        # cache step before Redis goes away, however the jobs and this test are scheduled.
        control = redis.Redis.from_url(server.url)
        control.client_pause(600_000, all=False)
        process = spawn_caption([str(folder), "--out", str(out), "--ray-address",
                                 ray_local.get_runtime_context().gcs_address, "--redis-url", server.url,
                                 *tiny_args(tiny_ov)])
        wait_for_held_write(control, process)  # the batch is under way, a job is storing its tokens
        control.close()
        server.stop()
        stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr[-2000:]
    records = read_records(out)
    assert len(records) == len(clips) and all(r.get("caption") for r in records)
    # Nothing was stored before Redis went away, so every video ran without the cache.
    assert all(r["cache"] == "unavailable" for r in records), [r["cache"] for r in records]
    assert "going on without it" in stderr  # the warning when it happened
    assert "went away during the batch" in stdout  # and the summary
