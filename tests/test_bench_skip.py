"""benchmarks/bench_skip.py runs end to end at a tiny size (a smoke test, not a measurement): every method it times
delivers, after its skip, the batch the uninterrupted pass delivers there, and its JSON says so.

The script runs in a subprocess with its results redirected to a temporary folder (``SYNCCKPT_BENCH_RESULTS``), so
the figures of a real run in benchmarks/results/ are left alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

METHODS = [
    "map-style, ResumableSampler",
    "map-style, accelerate.skip_first_batches",
    "streamed, with state (HF + StatefulDataLoader)",
    "streamed, count fallback (ResumableLoader)",
    "streamed, accelerate.skip_first_batches",
    "(reading the skipped samples once, for scale)",
]


@pytest.mark.slow
def test_bench_skip_at_a_tiny_size_writes_every_method_with_its_first_batch_right(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_skip.py"), "--samples", "2000", "--skip", "1500"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "SYNCCKPT_BENCH_RESULTS": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "skip.json").read_text())
    assert (out["samples"], out["skip"], out["batch"]) == (2000, 1472, 64)  # --skip rounded down to whole batches
    rows = {r["method"]: r for r in out["results"]}
    assert list(rows) == METHODS
    for method in METHODS[:-1]:
        assert rows[method]["first_ok"] is True, rows[method]
    assert all(r["skip_s"] >= 0 for r in rows.values())
