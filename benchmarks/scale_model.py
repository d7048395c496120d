"""The paper extrapolation of node-local mirroring (``syncckpt.nodes``) to many ranks and a large model: pure
functions over the coefficients bench_scale.py measured (requests per file, per node, per checkpoint, bytes per
manifest entry) and stated assumptions (:class:`Scenario`).

The transfer parameters come from the code that sends the requests, not from copies: s3fs's part size and
concurrency from ``FsspecRemote._put_options``, files in flight from ``FsspecRemote.max_workers``, the ranged-read
size and depth and the largest object read as one stream from ``syncckpt.remote.streams``, the manifest size limit
from ``syncckpt.manifest``.

    python benchmarks/scale_model.py [--results benchmarks/results/scale.json] [--doc docs/SCALE.md]

prints the generated tables, and with ``--doc`` replaces the part of the document between its
``<!-- scale-model:begin -->`` and ``<!-- scale-model:end -->`` lines with them.

>>> put_requests(1000), put_requests(64 << 20, part=16 << 20)  # one PUT; multipart: create + 4 parts + complete
(1, 6)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

OPS = ("PUT", "GET", "LIST", "HEAD", "DELETE", "POST")
WRITE_OPS = ("PUT", "POST", "DELETE")  # S3's 3,500/s class (PUT/COPY/POST/DELETE)
READ_OPS = ("GET", "HEAD", "LIST")  # S3's 5,500/s class (GET/HEAD; a LIST is a GET on the bucket)
S3_WRITE_PER_PREFIX = 3500
S3_READ_PER_PREFIX = 5500
BEGIN, END = "<!-- scale-model:begin -->", "<!-- scale-model:end -->"


def transfer_settings() -> dict[str, int]:
    """What syncckpt's S3 transfers use, read from the code that uses it."""
    from syncckpt.manifest import MAX_MANIFEST_BYTES
    from syncckpt.remote import streams
    from syncckpt.remote.fsspec import FsspecRemote

    s3 = FsspecRemote("s3://bucket/run", {"key": "k", "secret": "s"})  # builds s3fs; sends nothing
    opts = s3._put_options()
    return {
        "part_bytes": opts["chunksize"],
        "parts_in_flight_per_file": opts["max_concurrency"],
        "files_in_flight": s3.max_workers,
        "read_part_bytes": streams._PREFETCH_PART,
        "read_bytes_in_flight": streams._READ_BYTES_IN_FLIGHT,
        "stream_max_bytes": streams.STREAM_MAX,
        "max_manifest_bytes": MAX_MANIFEST_BYTES,
    }


def put_requests(size: int, part: int = 16 << 20) -> int:
    """Write-class requests s3fs's ``put_file`` makes for one file: one PUT below two parts (and 5 GiB), else a
    multipart upload: create (POST), one PUT per part, complete (POST)."""
    if size < min(5 << 30, 2 * part):
        return 1
    return 2 + math.ceil(size / part)


def data_puts(files: dict[str, int], ranks: dict[str, list[str]], node: int, ranks_per_node: int) -> int:
    """The write-class requests of ``node``'s data files (``files``: path -> size; ``ranks``: who wrote what)."""
    part = transfer_settings()["part_bytes"]
    mine = {p for r in range(node * ranks_per_node, (node + 1) * ranks_per_node) for p in ranks.get(str(r), ())}
    return sum(put_requests(files[p], part) for p in mine)


# ---- the extrapolation --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Scenario:
    """What the extrapolation assumes. State per parameter: bf16 weights (2 B) + fp32 master weights (4 B) + fp32
    AdamW exp_avg and exp_avg_sq (4 + 4 B) = 14 B, sharded evenly (FSDP2 through DCP: one shard file per rank)."""

    ranks: int = 1000
    ranks_per_node: int = 8
    params: float = 70e9
    bytes_per_param: int = 14
    keep_last: int = 2  # the checkpoints retention keeps (the coordinator caches their manifests)
    node_bandwidth: float = 1.25e9  # bytes/s between one node and S3 (10 Gbit/s), each way
    stream_bandwidth: float = 100e6  # bytes/s of one request's body
    request_latency: float = 0.02  # s of a small request (time to first byte)
    prefixes: int = 1  # partitioned S3 prefixes the run's keys spread over
    part_bytes: int | None = None  # multipart part size; None: syncckpt's (FsspecRemote._put_options)
    poll_pause: float = 1.0  # the longest pause between the coordinator's polls for a part (NodeMirror._await_part)


def _w(d: dict[str, float]) -> float:
    return sum(d.get(op, 0) for op in WRITE_OPS)


def _r(d: dict[str, float]) -> float:
    return sum(d.get(op, 0) for op in READ_OPS)


def _throughput(bandwidth: float, in_flight: int, part: float, s: Scenario) -> float:
    """Bytes/s of one node: its bandwidth, or what ``in_flight`` requests of ``part`` bytes each move when each
    costs its body's time on one stream plus a request's latency, whichever is lower."""
    return min(bandwidth, in_flight * part / (part / s.stream_bandwidth + s.request_latency))


def extrapolate(m: dict[str, Any], s: Scenario, settings: dict[str, int] | None = None) -> dict[str, Any]:
    """Objects, bytes, request rates, coordinator memory and commit latency of one checkpoint of scenario ``s``,
    from the measured coefficients ``m`` (bench_scale.measured_inputs). Every node uploads at once; the rates
    are the mean over one node's upload (or download) time, all nodes together, against one prefix's limits
    times ``s.prefixes``."""
    t = dict(settings or transfer_settings())
    t["part_bytes"] = s.part_bytes or t["part_bytes"]
    nodes = math.ceil(s.ranks / s.ranks_per_node)
    shard = s.params * s.bytes_per_param / s.ranks
    small, small_bytes = m["small_files_per_rank"], m["small_bytes_per_rank"]
    entries = s.ranks * (small + 1) + 1  # every rank's small files and DCP shard, + dcp/index.json
    objects = entries + nodes + 1  # + each node's part + manifest.json
    per_node_bytes = s.ranks_per_node * (shard + small_bytes)
    # the upload: data files (multipart shards), then each node's HEAD per file and its part
    rank_writes = put_requests(int(shard), t["part_bytes"]) + small
    upload_writes = s.ranks * rank_writes + nodes * _w(m["node_requests"])
    heads = entries * _r(m["check_requests_per_file"]) + nodes * _r(m["node_requests"])
    in_flight = t["files_in_flight"] * t["parts_in_flight_per_file"]
    upload_s = per_node_bytes / _throughput(s.node_bandwidth, in_flight, min(t["part_bytes"], shard), s)
    # the resume: every node stats and reads its own ranks' files, rank 0's small files and the DCP index (a
    # HEAD and ranged GETs per file) after the manifest; the coordinator also lists the run
    streamed = shard <= t.get("stream_max_bytes", 0)  # one streamed GET per shard (streams.StreamReader)
    if streamed:
        reads_in_flight, read_piece = t["files_in_flight"], shard
    else:
        reads_in_flight, read_piece = max(1, t["read_bytes_in_flight"] // t["read_part_bytes"]), t["read_part_bytes"]
    resume_s = per_node_bytes / _throughput(s.node_bandwidth, reads_in_flight, read_piece, s)
    files_per_node = (s.ranks_per_node + 1) * (small + 1)
    per_file = _r(m["resume_node"]["per_file"])  # a HEAD and one GET for a file of one ranged read
    ranged_extra = 0 if streamed else s.ranks * (math.ceil(shard / t["read_part_bytes"]) - 1)
    resume_reads = nodes * (files_per_node * per_file + _r(m["resume_node"]["fixed"])) + ranged_extra
    resume_reads += _r(m["resume_coordinator"]["fixed"])
    # the commit: after the last part landed, the coordinator's poll pause, reading the parts it has not read yet
    # (all of them when every node finishes at once: one after another), its own requests, the manifest's bytes
    manifest_bytes = m["json_bytes_base"] + entries * m["json_bytes_per_entry"]
    part_reads = (nodes - 1) * _r(m["part_read_requests_per_node"])
    coordinator = _r(m["coordinator_requests"]) + _w(m["coordinator_requests"])
    commit_s = s.poll_pause + (part_reads + coordinator) * s.request_latency + manifest_bytes / s.node_bandwidth
    # retention, after the commit: a LIST page per 1,000 keys of the deleted checkpoint and a DELETE per object
    deletes = objects * _w(m["delete_requests_per_object"]) + math.ceil(objects / 1000) * m["delete_list_requests"]
    return {
        "ranks": s.ranks,
        "nodes": nodes,
        "params": s.params,
        "prefixes": s.prefixes,
        "state_bytes": s.params * s.bytes_per_param,
        "shard_bytes": shard,
        "objects_per_checkpoint": objects,
        "manifest_entries": entries,
        "bytes_per_node": per_node_bytes,
        "node_write_requests": s.ranks_per_node * rank_writes + _w(m["node_requests"]),
        "node_read_requests": s.ranks_per_node * (small + 1) * _r(m["check_requests_per_file"]),
        "write_requests_per_checkpoint": upload_writes + _w(m["coordinator_requests"]) + deletes,
        "upload_s": upload_s,
        "put_rate": upload_writes / upload_s,
        "put_rate_limit": S3_WRITE_PER_PREFIX * s.prefixes,
        "check_head_requests": heads,
        "check_head_burst_rate": nodes * t["files_in_flight"] / s.request_latency,
        "resume_s": resume_s,
        "resume_get_rate": resume_reads / resume_s,
        "get_rate_limit": S3_READ_PER_PREFIX * s.prefixes,
        "resume_list_requests": m["resume_coordinator"]["fixed"]["LIST"],
        "manifest_bytes": manifest_bytes,
        "max_manifest_bytes": t["max_manifest_bytes"],
        "coordinator_memory_bytes": entries * m["python_bytes_per_entry"] * (s.keep_last + 1) + 2 * manifest_bytes,
        "commit_latency_s": commit_s,
        "delete_requests": deletes,
        "delete_s": deletes * s.request_latency / t["files_in_flight"],
        "hub_files_per_commit": entries + 2,  # shared-directory mode: data, manifest.json, LATEST in one commit
        "hub_dcp_folder_entries": s.ranks + 1,
        "hub_files_in_repo": (s.keep_last + 1) * (entries + 1),
    }


def limits(m: dict[str, Any], s: Scenario, settings: dict[str, int] | None = None) -> dict[str, int]:
    """The largest rank counts (in steps of one node) that keep under each limit on one prefix: the PUT rate,
    the resume GET rate, the manifest's size limit."""
    t = settings or transfer_settings()
    out = {}
    for key, cap in (
        ("put_rate", "put_rate_limit"),
        ("resume_get_rate", "get_rate_limit"),
        ("manifest_bytes", "max_manifest_bytes"),
    ):
        lo, hi = 1, 1 << 24  # in nodes; every figure grows with the node count
        while lo < hi:
            mid = (lo + hi + 1) // 2
            e = extrapolate(m, dataclasses.replace(s, ranks=mid * s.ranks_per_node), t)
            lo, hi = (mid, hi) if e[key] <= e[cap] else (lo, mid - 1)
        out[key] = lo * s.ranks_per_node
    return out


# ---- the document -------------------------------------------------------------------------------------------
def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"


def render(result: dict[str, Any], scenarios: list[Scenario]) -> str:
    """The measured table and the extrapolated figures, as Markdown."""
    t = transfer_settings()
    cfg, m = result["config"], result["measured"]
    lines = [
        f"Measured: {cfg['nodes']} nodes x {cfg['ranks_per_node']} ranks, {cfg['params']:,} parameters "
        f"(fp32 + AdamW), a checkpoint every {cfg['save_every']} steps, {cfg['steps']} steps, moto S3 through the "
        f"counting proxy; manifest of {result['manifest']['name']}: {result['manifest']['entries']} entries, "
        f"{result['manifest']['manifest_bytes']:,} bytes.",
        "",
        "| checkpoint | node | commit latency s | PUT | GET | LIST | HEAD | DELETE | POST | bytes up | bytes down |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["checkpoints"]:
        lat = f"{row['commit_latency_s']:.3f}" if row["node"] == 0 and row["commit_latency_s"] is not None else ""
        ops = " | ".join(str(row[op]) for op in OPS)
        lines.append(
            f"| {row['checkpoint']} | {row['node']} | {lat} | {ops} | {row['bytes_up']:,} | {row['bytes_down']:,} |"
        )
    lines += ["", f"Resume on wiped disks (to step {result['resumed_step']}):", ""]
    lines += ["| node | PUT | GET | LIST | HEAD | DELETE | POST | bytes down |", "|---|---|---|---|---|---|---|---|"]
    for row in result["resume"]:
        lines.append(f"| {row['node']} | " + " | ".join(str(row[op]) for op in OPS) + f" | {row['bytes_down']:,} |")
    lines += ["", "Coefficients of the model (from the last checkpoint and the resume):", "", "```"]
    for key in ("check_requests_per_file", "node_requests", "part_read_requests_per_node", "part_polls_missed",
                "coordinator_requests", "delete_requests_per_object", "small_files_per_rank", "small_bytes_per_rank",
                "json_bytes_per_entry", "python_bytes_per_entry"):  # fmt: skip
        lines.append(f"{key}: {_short(m[key])}")
    lines.append(f"resume per file (node 1): {_short(m['resume_node']['per_file'])}")
    lines.append(f"resume fixed (node 0, the coordinator): {_short(m['resume_coordinator']['fixed'])}")
    lines.append(f"resume fixed (node 1): {_short(m['resume_node']['fixed'])}")
    lines += ["```", "", f"Transfer settings read from the code: {t}", ""]
    rows = [extrapolate(m, s, t) for s in scenarios]
    lines += ["| | " + " | ".join(_label(s, e) for s, e in zip(scenarios, rows, strict=True)) + " |"]
    lines += ["|---|" + "---|" * len(rows)]
    for label, fmt in _ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt(e) for e in rows) + " |")
    lim = limits(m, scenarios[0], t)
    lines += [
        "",
        f"On one prefix, with the first column's assumptions, the PUT rate stays under 3,500/s up to "
        f"**{lim['put_rate']:,} ranks**, the resume GET rate under 5,500/s up to **{lim['resume_get_rate']:,} "
        f"ranks**, and the manifest under its {t['max_manifest_bytes']:,}-byte limit up to "
        f"**{lim['manifest_bytes']:,} ranks**.",
    ]
    return "\n".join(lines)


def _label(s: Scenario, e: dict[str, Any]) -> str:
    part = f", {s.part_bytes >> 20} MiB parts" if s.part_bytes else ""
    prefixes = f"{s.prefixes} prefixes" if s.prefixes > 1 else "1 prefix"
    return f"{e['ranks']:,} ranks, {e['params'] / 1e9:g}B, {s.node_bandwidth * 8 / 1e9:g} Gbit/s, {prefixes}{part}"


def _short(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items() if x) + "}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


_ROWS = [
    ("nodes (8 ranks each)", lambda e: f"{e['nodes']:,}"),
    ("state per checkpoint", lambda e: _gb(e["state_bytes"])),
    ("shard per rank", lambda e: _gb(e["shard_bytes"])),
    ("bytes per node", lambda e: _gb(e["bytes_per_node"])),
    (
        "requests per node: PUT/POST/DELETE, HEAD",
        lambda e: f"{e['node_write_requests']:,.0f}, {e['node_read_requests']:,.0f}",
    ),
    ("objects per checkpoint", lambda e: f"{e['objects_per_checkpoint']:,.0f}"),
    ("write requests per checkpoint (PUT/POST/DELETE)", lambda e: f"{e['write_requests_per_checkpoint']:,.0f}"),
    ("upload time per node", lambda e: f"{e['upload_s']:.1f} s"),
    ("PUT-class rate during the upload", lambda e: f"{e['put_rate']:,.0f}/s (limit {e['put_rate_limit']:,})"),
    (
        "HEAD checks after the upload",
        lambda e: f"{e['check_head_requests']:,.0f}, burst {e['check_head_burst_rate']:,.0f}/s",
    ),
    ("resume: download time per node", lambda e: f"{e['resume_s']:.1f} s"),
    ("resume: GET/HEAD rate", lambda e: f"{e['resume_get_rate']:,.0f}/s (limit {e['get_rate_limit']:,})"),
    ("resume: LIST requests", lambda e: f"{e['resume_list_requests']:.0f}"),
    ("manifest.json", lambda e: f"{_gb(e['manifest_bytes'])} (limit {_gb(e['max_manifest_bytes'])})"),
    ("coordinator memory (manifests)", lambda e: _gb(e["coordinator_memory_bytes"])),
    ("commit latency after the last part (est.)", lambda e: f"{e['commit_latency_s']:.1f} s"),
    ("retention: deletes of the old checkpoint", lambda e: f"{e['delete_requests']:,.0f} in {e['delete_s']:.1f} s"),
    ("Hub (shared directory): files per commit", lambda e: f"{e['hub_files_per_commit']:,.0f} (recommended < 100)"),
    ("Hub: entries in the dcp/ folder", lambda e: f"{e['hub_dcp_folder_entries']:,} (recommended < 10,000)"),
    ("Hub: files in the repository", lambda e: f"{e['hub_files_in_repo']:,.0f} (recommended < 100,000)"),
]

SCENARIOS = [
    Scenario(),
    Scenario(node_bandwidth=12.5e9),
    Scenario(prefixes=4),
    Scenario(part_bytes=128 << 20),
    Scenario(ranks=8000, prefixes=40),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parent
    ap.add_argument("--results", type=Path, default=here / "results" / "scale.json")
    ap.add_argument("--doc", type=Path, default=None, help="replace the generated part of this Markdown file")
    args = ap.parse_args(argv)
    text = render(json.loads(args.results.read_text()), SCENARIOS)
    print(text)
    if args.doc is not None:
        doc = args.doc.read_text()
        head, _, rest = doc.partition(BEGIN)
        _, _, tail = rest.partition(END)
        if not rest or END not in rest:
            raise SystemExit(f"{args.doc}: no {BEGIN} ... {END} section")
        args.doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
