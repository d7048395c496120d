"""The benchmark scripts run: gpu_check.py says plainly that it measured nothing without a GPU, and a benchmark
module runs end to end at a tiny size (a smoke test, not a measurement). ``SYNCCKPT_HEAVY=1`` also runs the peers
benchmark (DCP, torch.save + put, syncckpt against one moto server) at a tiny size.

The scripts run in subprocesses with the results redirected to a temporary folder (``SYNCCKPT_BENCH_RESULTS``), so
the figures of a real run in benchmarks/results/ are left alone.
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

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
HEAVY = os.environ.get("SYNCCKPT_HEAVY", "") not in ("", "0")
NO_GPU = "no GPU found: nothing measured"


def run_script(script: str, *args: str, results: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "SYNCCKPT_BENCH_RESULTS": str(results), **env},
    )


@pytest.mark.slow
def test_gpu_check_without_a_gpu_says_nothing_measured_and_exits_0(tmp_path: Path) -> None:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too.
    proc = run_script("gpu_check.py", results=tmp_path, timeout=120, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == NO_GPU
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu_check would measure it")
def test_gpu_check_without_a_gpu_returns_within_a_second_after_imports(capsys: pytest.CaptureFixture) -> None:
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check  # torch is imported already: what remains is the script's own work
    finally:
        sys.path.remove(str(BENCH))
        if cublas is None:  # the script sets it for its own process; leave this one as it was
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    t0 = time.perf_counter()
    rc = gpu_check.main([])
    elapsed = time.perf_counter() - t0
    assert rc == 0
    assert capsys.readouterr().out.strip() == NO_GPU
    assert elapsed < 1.0


@pytest.mark.slow
def test_bench_stall_runs_at_a_tiny_size_and_writes_its_table_and_json(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = run_script("bench_stall.py", "--size", "0.5", "--repeat", "2", "--no-dcp", results=tmp_path, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert "syncckpt step() on a due save" in proc.stdout
    result = json.loads((tmp_path / "stall.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"warm in-memory copy (floor)", "syncckpt step() on a due save", "torch.save (sync, fsync)"}
    assert rows["warm in-memory copy (floor)"]["n"] == rows["syncckpt step() on a due save"]["n"] == 2
    assert all(r["median_s"] > 0 for r in rows.values())
    assert result["state_bytes"] >= 12 * result["params"] > 0  # fp32 weights + two AdamW moments
    assert elapsed < 15, f"the smoke run took {elapsed:.1f}s"


@pytest.mark.slow
@pytest.mark.skipif(not HEAVY, reason="starts moto and saves with three methods; SYNCCKPT_HEAVY=1 runs it")
def test_bench_peers_at_a_tiny_size_restores_every_method_exactly(tmp_path: Path) -> None:
    proc = run_script("bench_peers.py", "--size", "0.5", "--repeat", "1", results=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "peers.json").read_text())
    assert result["verified"] == {"dcp": True, "torch": "download only", "syncckpt": True}
    rows = {r["method"]: r for r in result["rows"]}
    assert len(rows) == 4
    for name, row in rows.items():
        assert row["stall_s"] > 0, name
        if not name.startswith("warm copy"):
            assert row["durable_s"] >= row["stall_s"] > 0 and row["resume_s"] > 0 and row["cpu_s_per_GB"] > 0, name
    assert set(result["targets"]) == {
        "stall <= 1.2x warm copy",
        "stall <= 0.8x DCP blocking",
        "time to durable <= 0.75x DCP",
        "resume <= 0.6x DCP load",
        "<= 2.0 CPU-s per GB mirrored",
    }


@pytest.mark.slow
@pytest.mark.skipif(not HEAVY, reason="moto and four arms of training; SYNCCKPT_HEAVY=1 runs it")
def test_bench_overhead_with_peers_runs_every_arm_in_the_same_rounds_and_writes_its_json(tmp_path: Path) -> None:
    args = ["--isolate-server", "--peers", "--layers", "1", "--duration", "8", "--every-seconds", "4"]
    proc = run_script("bench_overhead.py", *args, results=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "overhead_isolated_peers.json").read_text())
    arms = {b["arm"] for b in result["blocks"]}
    assert arms == {"none", "ckpt", "dcp", "put"}
    assert set(result["arms"]) == {"ckpt", "dcp", "put"}
    for arm in ("ckpt", "dcp", "put"):
        assert all(b["saves"] == 1 for b in result["blocks"] if b["arm"] == arm), arm  # one save per block
    assert len({b["round"] for b in result["blocks"]}) == 2
