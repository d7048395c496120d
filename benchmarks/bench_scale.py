"""The node-local scale benchmark: 2 torchrun "nodes" x 4 ranks (DDP on gloo, CPU, a small Linear stack), each
node with its own checkpoint directory, mirrored node-local to one moto S3 server; every request counted per node.

Each node's processes reach moto through their own port of a counting reverse proxy (``count_proxy.py``: real
HTTP, nothing mocked), which logs method, path, bytes and times of every request. The job (``scale_job.py``)
waits for every save, and rank 0 stamps when each one started (all ranks at the save) and when it was committed,
so every request falls in one checkpoint's window. Per checkpoint:

  * ``commit_latency_s``: from the end of the last data byte's PUT (any node; a multipart upload ends with its
    CompleteMultipartUpload POST) to the end of the PUT of LATEST naming it (of its manifest.json when LATEST was
    left alone): the coordinator waiting for the nodes' parts, then writing manifest, then LATEST;
  * per node: PUT, GET, LIST, HEAD, DELETE, POST requests and bytes up/down;
  * ``predicted_data_puts``: the data PUT/POST requests the scale model predicts from the files' sizes
    (s3fs's single-part/multipart rule), checked against the measured ones.

Then both local directories are wiped and the job is launched again: it resumes from the bucket; the LIST, GET and
HEAD requests per node until every rank has resumed are the resume's. The measured coefficients feed the paper
extrapolation (``scale_model.py``) to 1,000 ranks and 70B parameters, written to docs/SCALE.md with
``python benchmarks/scale_model.py --doc docs/SCALE.md``.

Usage:  python benchmarks/bench_scale.py [--ranks-per-node 4] [--steps 6] [--save-every 2] [--width 1024] [--layers 4]
Writes benchmarks/results/scale.json and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

sys.path.insert(0, str(Path(__file__).parent))
from common import BUCKET, MotoProcess, print_table, servers_module, unique_prefix, write_json  # noqa: E402
from count_proxy import CountingProxy, Request  # noqa: E402
from scale_model import OPS, READ_OPS, data_puts  # noqa: E402

from syncckpt.manifest import Manifest, parse_checkpoint_name  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
JOB = HERE / "scale_job.py"
NODES = 2


# ---- the request log, read (pure) ------------------------------------------------------------------------------
def key_of(r: Request, root: str) -> str | None:
    """The key relative to the run prefix ``root`` (``bucket/prefix``) a request touches (a LIST: its prefix);
    None outside the run."""
    if r.op == "LIST":
        prefix = parse_qs(r.query).get("prefix", [""])[0]
        path = f"{root.split('/', 1)[0]}/{prefix}"
    else:
        path = r.path.lstrip("/")
    if path.rstrip("/") == root:
        return ""
    return path[len(root) + 1 :] if path.startswith(root + "/") else None


def category(key: str | None) -> tuple[str, str | None]:
    """(what the key is, its checkpoint): data, part, manifest (of a checkpoint), latest, lease, run (the run
    prefix itself: listings), other."""
    if key is None:
        return "other", None
    key = key.rstrip("/")  # s3fs lists KEY/ after a HEAD of a missing KEY (is it a folder?)
    head, _, rest = key.partition("/")
    if parse_checkpoint_name(head) is None:
        return {"": "run", "LATEST": "latest", "LEASE": "lease"}.get(key, "other"), None
    if rest == "manifest.json":
        return "manifest", head
    if rest.startswith("parts/"):
        return "part", head
    return ("data" if rest else "run"), head


def tally(requests: list[Request]) -> dict[str, Any]:
    """Requests by class, and bytes each way."""
    ops = Counter(r.op for r in requests)
    return {
        **{op: ops.get(op, 0) for op in OPS},
        "requests": len(requests),
        "bytes_up": sum(r.up for r in requests),
        "bytes_down": sum(r.down for r in requests),
    }


def latest_name(r: Request) -> str | None:
    try:
        return json.loads(r.body or b"")["name"]
    except (ValueError, KeyError, TypeError):
        return None


def checkpoint_rows(log: list[Request], saves: list[dict[str, Any]], root: str, nodes: int) -> list[dict[str, Any]]:
    """One row per checkpoint and node: its requests (those that started in the save's window) and, on every
    row of the checkpoint, its commit latency."""
    rows = []
    for save in saves:
        name = save["name"]
        window = [r for r in log if save["start"] <= r.t0 <= save["end"]]
        kinds = [(r, *category(key_of(r, root))) for r in window]
        data_end = max(
            (r.t1 for r, cat, ck in kinds if cat == "data" and ck == name and r.op in ("PUT", "POST")), default=None
        )
        latest = [r.t1 for r, cat, _ in kinds if cat == "latest" and r.op == "PUT" and latest_name(r) == name]
        manifest = [r.t1 for r, cat, ck in kinds if cat == "manifest" and ck == name and r.op == "PUT"]
        committed = (latest or manifest or [None])[-1]
        latency = committed - data_end if committed is not None and data_end is not None else None
        for node in range(nodes):
            mine = [r for r, *_ in kinds if r.node == node]
            puts = sum(
                1 for r, cat, ck in kinds if r.node == node and cat == "data" and ck == name and r.op in ("PUT", "POST")
            )
            row = {"checkpoint": name, "node": node, **tally(mine), "commit_latency_s": latency, "data_puts": puts}
            rows.append(row)
    return rows


def resume_rows(log: list[Request], resumed_at: float, nodes: int) -> list[dict[str, Any]]:
    """Per node, every request of the relaunched job until every rank had resumed."""
    return [{"node": n, **tally([r for r in log if r.node == n and r.t0 <= resumed_at])} for n in range(nodes)]


# ---- the measured coefficients -------------------------------------------------------------------------------
def _ops(requests: list[Any]) -> dict[str, int]:
    c = Counter(r.op for r in requests)
    return {op: c.get(op, 0) for op in OPS}


def _per(counts: dict[str, int], n: float) -> dict[str, float]:
    return {op: v / n for op, v in counts.items()} if n else dict.fromkeys(counts, 0.0)


def _minus(a: dict[str, float], *bs: dict[str, float]) -> dict[str, float]:
    return {op: a[op] - sum(b.get(op, 0) for b in bs) for op in a}


def measured_inputs(
    first: list[Any],
    second: list[Any],
    saves: list[dict[str, Any]],
    resumed_at: float,
    facts: dict[str, Any],
    root: str,
    ranks_per_node: int,
) -> dict[str, Any]:
    """The coefficients of the last checkpoint (the steady state: retention deletes an older one) and of the
    resume, split by mechanism: per data file, per node, per other node's part (the coordinator), per object of
    the deleted checkpoint, and the coordinator's fixed requests."""
    save = saves[-1]
    name = save["name"]  # the steady state: retention deleted an older checkpoint
    window = [(r, *category(key_of(r, root))) for r in first if save["start"] <= r.t0 <= save["end"]]
    ranks = facts["ranks"]
    node_files = {n: [p for r in _ranks(n, ranks_per_node) for p in ranks.get(str(r), ())] for n in (0, 1)}

    def on(node: int, test) -> list[Any]:  # noqa: ANN001
        return [r for r, cat, ck in window if r.node == node and test(r, cat, ck)]

    data1 = _ops(on(1, lambda r, cat, ck: cat == "data" and ck == name))
    node_level = _ops(on(1, lambda r, cat, ck: cat != "data"))  # a node that is not the coordinator
    polls = on(0, lambda r, cat, ck: cat == "part" and ck == name and not r.path.endswith("node-0.json"))
    part_reads = _ops([r for r in polls if r.status < 400])  # the part is there: one GET
    misses = sum(1 for r in polls if r.status == 404)
    # retention: the checkpoints the coordinator deleted, their DELETEs and the LIST that found their objects
    gone = {ck for r, cat, ck in window if r.node == 0 and r.op == "DELETE" and ck not in (None, name)}
    deletion = on(0, lambda r, cat, ck: ck in gone and r.op in ("DELETE", "LIST"))
    deleted_objects = sum(1 for r in deletion if r.op == "DELETE")
    own_data = _ops(on(0, lambda r, cat, ck: not (cat == "data" and ck == name)))
    coordinator = _minus(own_data, node_level, _ops(polls), _ops(deletion))
    # resume: per needed file, and the rest per node
    needed = {n: set(ranks.get("0", ())) | set(node_files[n]) for n in (0, 1)}
    resume = [(r, *category(key_of(r, root))) for r in second if r.t0 <= resumed_at]
    res = {}
    for n in (0, 1):
        files = _ops([r for r, cat, _ in resume if r.node == n and cat == "data"])
        rest = _ops([r for r, cat, _ in resume if r.node == n and cat != "data"])
        res[n] = {"per_file": _per(files, len(needed[n])), "fixed": rest, "files": len(needed[n])}
    sizes = facts["files"]
    small = [p for r, ps in ranks.items() if r != "0" for p in ps]
    return {
        "checkpoint": name,
        "check_requests_per_file": _per({k: v for k, v in data1.items() if k in READ_OPS}, len(node_files[1])),
        "node_requests": node_level,
        "part_read_requests_per_node": part_reads,
        "part_polls_missed": misses,  # each a GET answered 404; timing, not scale
        "coordinator_requests": coordinator,
        "delete_requests_per_object": _per(_ops([r for r in deletion if r.op == "DELETE"]), deleted_objects),
        "delete_list_requests": sum(1 for r in deletion if r.op == "LIST"),
        "deleted_objects": deleted_objects,
        "resume_coordinator": res[0],
        "resume_node": res[1],
        "small_files_per_rank": len(small) / max(1, len(ranks) - 1),
        "small_bytes_per_rank": sum(sizes[p] for p in small) / max(1, len(ranks) - 1),
        "json_bytes_base": facts["json_bytes_base"],
        "json_bytes_per_entry": facts["json_bytes_per_entry"],
        "python_bytes_per_entry": facts["python_bytes_per_entry"],
    }


def _ranks(node: int, per_node: int) -> range:
    return range(node * per_node, (node + 1) * per_node)


# ---- running the job ----------------------------------------------------------------------------------------
def launch(tree: Path, url: str, options: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Both nodes of one launch, to the end; returns rank 0's marks. Raises with the output's tail on failure."""
    port = servers_module().rendezvous_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SYNCCKPT_NODE_LOCAL="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    procs, outputs = [], []
    for node in range(NODES):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES)]
        cmd += ["--nproc-per-node", str(args.ranks_per_node), "--node_rank", str(node)]
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), str(JOB)]
        cmd += [f"--ckpt-dir={tree / f'node{node}' / 'ck'}", f"--remote={url}"]
        cmd += [f"--storage-options={json.dumps(options[node])}", f"--steps={args.steps}"]
        cmd += [f"--save-every={args.save_every}", f"--width={args.width}", f"--layers={args.layers}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
        outputs.append([])
    readers = [
        threading.Thread(target=lambda p=p, out=out: out.extend(p.stdout), daemon=True)
        for p, out in zip(procs, outputs, strict=True)
    ]
    for t in readers:
        t.start()
    try:
        deadline = time.monotonic() + args.timeout
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:  # a timeout: torchrun forwards SIGTERM to its ranks and waits for them
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    for t in readers:
        t.join(30)
    if any(codes):
        tail = "".join(f"--- node {n}\n" + "".join(o[-30:]) for n, o in enumerate(outputs))
        raise RuntimeError(f"the job failed (exit codes {codes}):\n{tail}")
    return [json.loads(line[5:]) for line in outputs[0] if line.startswith("mark ")]


def manifest_facts(store: Any, root: str, name: str) -> dict[str, Any]:
    """The committed manifest of ``name``: its size, entries, which rank wrote which file, and the JSON and
    Python-object bytes per entry (the coordinator's memory per entry)."""
    data = store.cat_file(f"{root}/{name}/manifest.json")
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    m = Manifest.from_bytes(data)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    empty = dataclasses.replace(m, files=[], extra={**m.extra, "ranks": {}})
    ranks = m.extra["ranks"]
    return {
        "name": name,
        "manifest_bytes": len(data),
        "entries": len(m.files),
        "files": {e.path: e.size for e in m.files},
        "ranks": ranks,
        "json_bytes_base": len(empty.to_bytes()),
        "json_bytes_per_entry": (len(data) - len(empty.to_bytes())) / len(m.files),
        "python_bytes_per_entry": held / len(m.files),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    tree = Path(tempfile.mkdtemp(prefix="syncckpt-scale-"))
    moto = MotoProcess().start()
    proxy = CountingProxy(moto.endpoint_url, NODES).start()
    try:
        url = unique_prefix("s3", "scale")
        root = url.split("://", 1)[1]
        base = moto.options()
        options = [
            {**base, "client_kwargs": {**base["client_kwargs"], "endpoint_url": proxy.endpoint(n)}} for n in (0, 1)
        ]
        t0 = time.monotonic()
        marks = launch(tree, url, options, args)
        first = proxy.snapshot()
        saves = [m for m in marks if m["event"] == "save"]
        if not saves:
            raise RuntimeError(f"no checkpoint was saved: {marks}")
        import s3fs

        store = s3fs.S3FileSystem(**base, skip_instance_cache=True)
        facts = manifest_facts(store, root, saves[-1]["name"])
        for node in range(NODES):  # new VMs: the bucket is all there is
            shutil.rmtree(tree / f"node{node}" / "ck")
        count = len(proxy.snapshot())
        marks2 = launch(tree, url, options, args)
        resumed = [m for m in marks2 if m["event"] == "resumed"]
        if not resumed or resumed[0]["step"] != args.steps:
            raise RuntimeError(f"the relaunch did not resume: {marks2}")
        second = proxy.snapshot()[count:]
        elapsed = time.monotonic() - t0
    finally:
        proxy.stop()
        moto.stop()
        shutil.rmtree(tree, ignore_errors=True)
    rows = checkpoint_rows(first, saves, root, NODES)
    for r in rows:
        r["predicted_data_puts"] = data_puts(facts["files"], facts["ranks"], r["node"], args.ranks_per_node)
    resume = resume_rows(second, resumed[0]["end"], NODES)
    startup = [
        {"node": n, **tally([r for r in first if r.node == n and r.t0 < saves[0]["start"]])} for n in range(NODES)
    ]
    by_key = [
        {"launch": launch_no, "node": r.node, "op": r.op, "key": key_of(r, root), "status": r.status}
        | {"up": r.up, "down": r.down, "t0": r.t0, "t1": r.t1}
        for launch_no, log in ((1, first), (2, second))
        for r in log
    ]
    return {
        "config": {
            "nodes": NODES,
            "ranks_per_node": args.ranks_per_node,
            "steps": args.steps,
            "save_every": args.save_every,
            "width": args.width,
            "layers": args.layers,
            "params": args.layers * (args.width * args.width + args.width),
        },
        "bucket": BUCKET,
        "elapsed_s": elapsed,
        "checkpoints": rows,
        "startup": startup,
        "resume": resume,
        "resumed_step": resumed[0]["step"],
        "marks": {"first": marks, "relaunch": marks2},
        "manifest": facts,
        "requests": by_key,
        "measured": measured_inputs(first, second, saves, resumed[0]["end"], facts, root, args.ranks_per_node),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks-per-node", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps (each launch trains to this step)")
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument(
        "--width", type=int, default=1024, help="the Linear stack's width (1024: a multipart optimizer file)"
    )
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    args = ap.parse_args(argv)
    result = run(args)
    cols = ["checkpoint", "node", "commit_latency_s", "PUT", "GET", "LIST", "HEAD", "DELETE", "POST"]
    cols += ["bytes_up", "bytes_down", "data_puts", "predicted_data_puts"]
    n = args.ranks_per_node * NODES
    print_table(
        f"Per checkpoint and node ({NODES} nodes x {args.ranks_per_node} ranks, node-local, moto S3)",
        result["checkpoints"],
        cols,
    )
    print_table(
        f"Resume of the relaunched job on wiped disks ({n} ranks)", result["resume"], ["node", *cols[3:9], "bytes_down"]
    )
    path = write_json("scale", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
