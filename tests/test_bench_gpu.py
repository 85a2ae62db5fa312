"""bench/gpu.py: the one-command GPU benchmark works (its dry run), not its figures.

The dry run runs in a subprocess where ray, redis and decord cannot be imported (the GPU machine has none of
them); the section runner's promises (an error recorded and the next section run, the file rewritten after
every section, a budget that cuts and skips, --only keeping the other sections) are checked on stand-in sections.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bench.gpu as gpu

ROOT = Path(__file__).resolve().parents[1]
# Like the GPU machine: no ray, no redis, no decord (a None in sys.modules makes their import fail).
WITHOUT = ("import sys, runpy; sys.modules.update(ray=None, redis=None, decord=None); "
           "runpy.run_module('bench.gpu', run_name='__main__', alter_sys=True)")


def numbers_in(value) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, (int, float)):
        return 1
    if isinstance(value, dict):
        return sum(numbers_in(v) for v in value.values())
    if isinstance(value, list):
        return sum(numbers_in(v) for v in value)
    return 0


@pytest.mark.timeout(400)
def test_dry_run_writes_every_section_with_numbers(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-c", WITHOUT, "--dry-run", "--out", str(out), "--budget-s", "1000",
                           "--section-timeout-s", "300"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=390)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] and data["environment"]["transformers"]
    assert set(data["sections"]) == {s.name for s in gpu.SECTIONS}
    for name, entry in data["sections"].items():
        assert entry["status"] == "ok", f"{name}: {entry.get('error')}\n{entry.get('traceback', '')}"
        assert entry["seconds"] > 0 and entry["peak_memory_mib"] > 0, name
        assert numbers_in(entry["result"]) >= 3, name
    assert "bench.gpu: done" in done.stderr  # progress is logged, with timestamps
    assert all(f"section {s.name}: ok" in done.stderr for s in gpu.SECTIONS)


def _ok(r):
    return {"value": 1.5}


def _boom(r):
    raise RuntimeError("no such kernel")


def _spin(r):
    deadline = time.monotonic() + 60  # cut by the section's time limit long before this
    while time.monotonic() < deadline:
        pass
    return {"value": 0}


def test_a_failing_or_overlong_section_is_recorded_and_the_next_runs(tmp_path):
    out = tmp_path / "r.json"
    seen = {}

    def after(r):
        seen.update(json.loads(out.read_text())["sections"])  # what the file held before this section
        return {"value": 2}

    sections = [gpu.Section("a", _ok, 1), gpu.Section("b", _boom, 1), gpu.Section("c", _spin, 1),
                gpu.Section("d", after, 1)]
    data = gpu.run_sections(sections, gpu.Run("cpu", "float32", True), out, {"sections": {}}, budget_s=100,
                            section_timeout_s=0.3)
    status = {name: entry["status"] for name, entry in data["sections"].items()}
    assert status == {"a": "ok", "b": "error", "c": "error", "d": "ok"}
    assert "no such kernel" in data["sections"]["b"]["error"]
    assert "timed out" in data["sections"]["c"]["error"]
    assert set(seen) == {"a", "b", "c"}  # written after every section
    assert json.loads(out.read_text())["sections"]["d"]["result"] == {"value": 2}


def test_the_budget_cuts_the_running_section_and_skips_the_rest(tmp_path):
    out = tmp_path / "r.json"
    sections = [gpu.Section("c", _spin, 1), gpu.Section("d", _ok, 1)]
    data = gpu.run_sections(sections, gpu.Run("cpu", "float32", True), out, {"sections": {}}, budget_s=0.3,
                            section_timeout_s=100)
    assert data["sections"]["c"]["status"] == "error" and "timed out" in data["sections"]["c"]["error"]
    assert data["sections"]["d"]["status"] == "skipped"
    assert json.loads(out.read_text())["sections"]["d"]["status"] == "skipped"


def test_only_reruns_some_sections_and_keeps_the_others(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"sections": {"x.old": {"status": "ok", "result": {"value": 7}},
                                            "x.b": {"status": "error", "error": "before"}}}))
    monkeypatch.setattr(gpu, "SECTIONS", [gpu.Section("x.old", _boom, 1), gpu.Section("x.b", _ok, 1)])
    assert gpu.main(["--dry-run", "--only", "x.b", "--out", str(out)]) == 0
    sections = json.loads(out.read_text())["sections"]
    assert sections["x.b"] == {**sections["x.b"], "status": "ok", "result": {"value": 1.5}}
    assert sections["x.old"] == {"status": "ok", "result": {"value": 7}}
    assert gpu.main(["--dry-run", "--only", "x", "--out", str(out)]) == 0  # a prefix names both
    assert json.loads(out.read_text())["sections"]["x.old"]["status"] == "error"


def test_an_unknown_section_is_one_line_and_exit_2(tmp_path, capsys):
    assert gpu.main(["--dry-run", "--only", "nope", "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown section(s) nope" in err
    assert not (tmp_path / "r.json").exists()


def test_synthetic_kv_is_written_on_the_pools_device():
    """bench/serve_kv.py's random K/V go to a pool that is not on the CPU (the meta device stands in for CUDA:
    it refuses a CPU source just as CUDA does)."""
    import torch

    from bench.serve_kv import write_random
    from dymu.engine.block_manager import BlockManager

    pool = BlockManager(4, 16, 2, 8, "meta", torch.float32)
    write_random(pool, torch.arange(3, device="meta"), torch.Generator().manual_seed(0))
