"""The scale benchmark: its extrapolation (benchmarks/scale_model.py, pure) on inputs whose results are worked out
by hand, and, with ``SYNCCKPT_HEAVY=1``, the benchmark itself (2 torchrun nodes x 4 ranks against moto through the
counting proxy) at its smallest size, with its JSON checked.
"""

from __future__ import annotations

import dataclasses
import doctest
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
HEAVY = os.environ.get("SYNCCKPT_HEAVY", "") not in ("", "0")
sys.path.insert(0, str(BENCH))
import count_proxy  # noqa: E402
import scale_model  # noqa: E402
from scale_model import Scenario, extrapolate, limits, put_requests  # noqa: E402

sys.path.remove(str(BENCH))

MiB = 1 << 20
SETTINGS = {
    "part_bytes": 16 * MiB,
    "parts_in_flight_per_file": 4,
    "files_in_flight": 8,
    "read_part_bytes": 64 * MiB,
    "read_bytes_in_flight": 512 * MiB,
    "max_manifest_bytes": 4 * MiB,
}
MEASURED = {
    "small_files_per_rank": 2,
    "small_bytes_per_rank": 0,
    "check_requests_per_file": {"HEAD": 1},
    "node_requests": {"PUT": 1, "DELETE": 1},
    "part_read_requests_per_node": {"HEAD": 1, "GET": 1},
    "coordinator_requests": {"PUT": 2, "GET": 1, "HEAD": 5, "LIST": 2},
    "delete_requests_per_object": {"DELETE": 1},
    "delete_list_requests": 1,
    "resume_node": {"per_file": {"HEAD": 1, "GET": 1}, "fixed": {"HEAD": 1, "GET": 1}},
    "resume_coordinator": {"fixed": {"LIST": 2, "HEAD": 6, "GET": 3}},
    "json_bytes_base": 500,
    "json_bytes_per_entry": 100,
    "python_bytes_per_entry": 600,
}


def test_put_requests_follow_s3fs_single_part_and_multipart_rule() -> None:
    part = 16 * MiB
    assert put_requests(0, part) == put_requests(2 * part - 1, part) == 1
    assert put_requests(2 * part, part) == 2 + 2  # create + 2 parts + complete
    assert put_requests(2 * part + 1, part) == 2 + 3
    assert put_requests(6 << 30, part) == 2 + 384  # over 5 GiB: always multipart


def test_extrapolation_to_1000_ranks_and_70b_matches_the_hand_computed_figures() -> None:
    e = extrapolate(MEASURED, Scenario(), SETTINGS)
    shard = 70e9 * 14 / 1000  # bf16 + fp32 master + two fp32 moments, 1/1000th each
    assert e["nodes"] == 125 and e["shard_bytes"] == pytest.approx(shard)
    assert e["manifest_entries"] == 3 * 1000 + 1  # shard + 2 small files per rank, + the DCP index
    assert e["objects_per_checkpoint"] == 3001 + 125 + 1  # + a part per node + manifest.json
    per_shard = 2 + math.ceil(shard / (16 * MiB))  # 61: create, 59 parts, complete
    assert per_shard == 61
    upload_writes = 1000 * (per_shard + 2) + 125 * 2
    upload_s = 8 * shard / 1.25e9  # bandwidth-bound: 32 parts in flight would move 2.9 GB/s
    assert e["upload_s"] == pytest.approx(upload_s)
    assert e["put_rate"] == pytest.approx(upload_writes / upload_s)  # about 10,084/s
    assert e["put_rate"] > e["put_rate_limit"] == 3500
    assert e["manifest_bytes"] == 500 + 3001 * 100
    assert e["coordinator_memory_bytes"] == 3001 * 600 * 3 + 2 * e["manifest_bytes"]  # keep_last=2 + the new one
    assert e["commit_latency_s"] == pytest.approx(1.0 + (124 * 2 + 10) * 0.02 + e["manifest_bytes"] / 1.25e9)
    assert e["delete_requests"] == 3127 + 4  # a DELETE per object, a LIST page per 1,000 keys
    assert e["resume_list_requests"] == 2
    reads = 125 * (9 * 3 * 2 + 2) + 1000 * (math.ceil(shard / (64 * MiB)) - 1) + 11
    resume_s = 8 * shard / min(1.25e9, 8 * 64 * MiB / (64 * MiB / 100e6 + 0.02))  # bound by 512 MiB in flight
    assert e["resume_get_rate"] == pytest.approx(reads / resume_s)


def test_prefixes_and_larger_parts_bring_the_put_rate_under_the_limit() -> None:
    one = extrapolate(MEASURED, Scenario(), SETTINGS)
    four = extrapolate(MEASURED, Scenario(prefixes=4), SETTINGS)
    big = extrapolate(MEASURED, Scenario(part_bytes=128 * MiB), SETTINGS)
    assert four["put_rate"] == one["put_rate"] < four["put_rate_limit"] == 4 * 3500
    assert big["put_rate"] < 3500 < one["put_rate"]


def test_limits_are_the_largest_node_multiples_under_each_cap() -> None:
    s = Scenario()
    found = limits(MEASURED, s, SETTINGS)
    for key, cap in (("put_rate", 3500), ("resume_get_rate", 5500), ("manifest_bytes", 4 * MiB)):
        at = extrapolate(MEASURED, dataclasses.replace(s, ranks=found[key]), SETTINGS)
        over = extrapolate(MEASURED, dataclasses.replace(s, ranks=found[key] + s.ranks_per_node), SETTINGS)
        assert at[key] <= cap < over[key], key
    assert found["manifest_bytes"] == (4 * MiB - 500) // 300 // 8 * 8  # 300 JSON bytes per rank


def test_doctests_of_the_model_and_the_proxy_pass() -> None:
    for module in (scale_model, count_proxy):
        assert doctest.testmod(module).failed == 0, module.__name__


@pytest.mark.slow
@pytest.mark.skipif(not HEAVY, reason="two launches of 2 torchrun nodes x 4 ranks; SYNCCKPT_HEAVY=1 runs it")
def test_bench_scale_at_its_smallest_size_counts_every_request_per_node(tmp_path: Path) -> None:
    args = ["--width", "64", "--layers", "2", "--steps", "6", "--save-every", "2"]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_scale.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "SYNCCKPT_BENCH_RESULTS": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Per checkpoint and node" in proc.stdout and "Resume of the relaunched job" in proc.stdout
    result = json.loads((tmp_path / "scale.json").read_text())
    rows = result["checkpoints"]
    assert [(r["checkpoint"], r["node"]) for r in rows] == [
        (f"checkpoint-step-{s}", n) for s in (2, 4, 6) for n in (0, 1)
    ]
    for r in rows:
        assert r["data_puts"] == r["predicted_data_puts"] > 0, r
        assert r["commit_latency_s"] > 0 and r["bytes_up"] > 0, r
        if r["node"] == 1:  # not the coordinator: it neither lists nor reads anything
            assert r["LIST"] == r["GET"] == 0 and r["DELETE"] == 1, r
    last = rows[4]  # checkpoint-step-6 on node 0: retention deleted checkpoint-step-2 (keep_last=2)
    m = result["measured"]
    assert m["deleted_objects"] > result["manifest"]["entries"] and last["DELETE"] >= m["deleted_objects"]
    assert m["check_requests_per_file"] == {"GET": 0, "HEAD": 1, "LIST": 0}
    assert result["resumed_step"] == 6
    resume = {r["node"]: r for r in result["resume"]}
    assert resume[0]["LIST"] >= 1 and resume[1]["LIST"] == 0  # only the coordinator lists the run
    assert resume[0]["GET"] > 0 and resume[1]["GET"] > 0 and resume[1]["PUT"] == 0
    assert result["manifest"]["json_bytes_per_entry"] > 0 and result["manifest"]["python_bytes_per_entry"] > 0
    assert {r["launch"] for r in result["requests"]} == {1, 2}
