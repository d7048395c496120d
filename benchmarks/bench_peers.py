"""syncckpt against its peers, in one run, against the same moto S3 server: stall, time to durable, resume, CPU.

Methods (every one saves the same model + AdamW state to the same bucket, in rotated and reversed order each
round, each save after the server went idle and the previous save was durable):

  * ``DCP``: ``torch.distributed.checkpoint.async_save`` with ``FsspecWriter("s3://...", thread_count=4)``
    (single process, ``no_dist=True``; the default stager copies the state into fresh CPU memory),
  * ``torch.save + put``: ``torch.save`` to a local file on the training thread, then an s3fs ``put`` of that
    file on a thread (what a Trainer / Lightning user with an upload callback gets),
  * ``syncckpt``: ``CheckpointManager(remote="s3://...").step()`` on a due save (staging buffers warm), mirrored
    in the background (``keep_last=2``: its remote retention runs inside its measured time),
  * ``warm copy`` (the floor, not a peer): ``copy_`` of every tensor into preallocated, touched tensors.

Per method:
  * ``stall_s``: how long the training thread is blocked by the save call (``state_dict()`` calls included),
  * ``durable_s``: from the save call until the checkpoint is complete in the bucket (DCP's future resolved, the
    put's thread joined, ``mgr.wait()`` returned),
  * ``cpu_s_per_GB``: CPU-seconds of the whole training process (``getrusage(RUSAGE_SELF)``: every thread; the
    moto server is another process, reported apart as ``server_cpu_s``) from the save call until durable, per GB
    of state,
  * ``resume_s``: a fresh session restoring the newest checkpoint from the bucket into a model + optimizer
    (fresh s3fs instance, empty local folder): DCP ``load`` + ``load_state_dict``; syncckpt
    ``CheckpointManager(...)`` + ``resume()`` (setup, lease, download, SHA-256, restore); for torch.save only the
    ``s3fs.get`` of the file, since this project never unpickles a checkpoint (``torch.load`` is not run): a lower
    bound for that method. The restored tensors are compared with the saved ones after every resume.

The first save of each method (buffer allocation, connections, imports) is a warm-up, reported apart. Ratios
measured side by side are what count: moto runs on the same CPUs as the client (see benchmarks/README.md).

Usage:  python benchmarks/bench_peers.py [--size 16] [--repeat 3] [--methods dcp,torch,syncckpt] [--background-nice 19]
Writes benchmarks/results/peers.json (peers_isolated.json with ``--isolate-server``) and prints a table.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import fsspec
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    build_mlp,
    cpu_seconds,
    isolate_benchmark,
    load_average,
    mlp_step,
    moto_s3,
    n_params,
    pin_server,
    print_table,
    process_cpu_seconds,
    ratio,
    settle,
    state_bytes,
    unique_prefix,
    write_json,
)

from syncckpt import CheckpointManager  # noqa: E402

warnings.filterwarnings("ignore", message="torch.distributed is disabled")

LABELS = {
    "copy": "warm copy (floor)",
    "dcp": "DCP async_save, FsspecWriter x4",
    "torch": "torch.save + s3fs put thread",
    "syncckpt": "syncckpt step() + mirror",
}


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(model.state_dict().values())
    for st in opt.state_dict()["state"].values():
        out.extend(v for v in st.values() if isinstance(v, torch.Tensor))
    return out


class WarmCopy:
    """The floor: every tensor copied into buffers allocated and touched beforehand."""

    def __init__(self, model, opt) -> None:
        self.model, self.opt = model, opt
        self.bufs = [torch.empty_like(t).zero_() for t in state_tensors(model, opt)]

    def start(self, step: int) -> None:
        for b, t in zip(self.bufs, state_tensors(self.model, self.opt), strict=True):
            b.copy_(t)

    def finish(self, handle: Any) -> None:
        pass


class Dcp:
    def __init__(self, model, opt, url: str, options: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

        self.dcp, self.writer_cls, self.reader_cls = dcp, FsspecWriter, FsspecReader
        self.model, self.opt, self.url, self.options = model, opt, url, options
        self.saved: list[str] = []

    def start(self, step: int) -> Any:
        path = f"{self.url}/step-{step}"
        self.saved.append(path)
        writer = self.writer_cls(path, thread_count=4, **self.options)
        return self.dcp.async_save(full_state(self.model, self.opt), storage_writer=writer, no_dist=True)

    def finish(self, future: Any) -> None:
        future.result()

    def resume(self, model, opt, scratch: Path) -> None:
        state = full_state(model, opt)
        reader = self.reader_cls(self.saved[-1], skip_instance_cache=True, **self.options)
        self.dcp.load(state, storage_reader=reader, no_dist=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])

    def prune(self, fs: Any) -> None:
        """Delete all but the newest checkpoint (outside the measured time; syncckpt's keep_last=2 is inside)."""
        while len(self.saved) > 2:
            fs.rm(self.saved.pop(0), recursive=True)


class TorchSavePut:
    def __init__(self, model, opt, url: str, options: dict[str, Any], local: Path) -> None:
        self.model, self.opt, self.url, self.options, self.local = model, opt, url, options, local
        self.fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)  # one per run, like a callback's
        local.mkdir(parents=True, exist_ok=True)
        self.saved: list[str] = []

    def start(self, step: int) -> Any:
        path = self.local / f"step-{step}.pt"
        torch.save(full_state(self.model, self.opt), path)
        remote = f"{self.url}/step-{step}.pt"
        self.saved.append(remote)
        box: dict[str, BaseException] = {}

        def put() -> None:
            try:
                self.fs.put(str(path), remote)
            except BaseException as e:  # re-raised on the training thread by finish()
                box["error"] = e

        thread = threading.Thread(target=put, name="torch-save-put", daemon=True)
        thread.start()
        return thread, box

    def finish(self, handle: Any) -> None:
        thread, box = handle
        thread.join()
        if "error" in box:
            raise box["error"]

    def resume(self, model, opt, scratch: Path) -> None:
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **self.options)
        fs.get(self.saved[-1], str(scratch / "resume.pt"))  # download only: torch.load is never run here

    def prune(self, fs: Any) -> None:
        while len(self.saved) > 2:
            old = self.saved.pop(0)
            fs.rm(old)
            (self.local / old.rsplit("/", 1)[1]).unlink(missing_ok=True)


class Syncckpt:
    def __init__(self, model, opt, url: str, options: dict[str, Any], local: Path, nice: int = 19) -> None:
        self.model, self.opt, self.url, self.options = model, opt, url, options
        self.mgr = CheckpointManager(
            local,
            save_every_n_steps=1,
            keep_last=2,
            remote=url,
            storage_options=options,
            handle_sigterm=False,
            background_nice=nice,
        )
        self.mgr.register(model=model, optimizer=opt)
        self.last = 0
        self.local_commit_s: list[float] = []  # save call -> committed on local disk (then the mirror starts)
        self.setup_s: list[float] = []  # fresh session: CheckpointManager(...) + register() before resume()

    def start(self, step: int) -> float:
        t0 = time.perf_counter()
        if not self.mgr.step(step, epoch=0, batch_idx=step):
            raise RuntimeError(f"syncckpt did not save at step {step}")
        self.last = step
        return t0

    def finish(self, t0: float) -> None:
        writer = getattr(self.mgr, "_writer", None)  # a private handle, for the breakdown only
        if writer is not None:
            writer.wait()
            self.local_commit_s.append(time.perf_counter() - t0)
        if not self.mgr.wait():
            raise RuntimeError(f"syncckpt: wait() returned with work pending: {self.mgr.status()}")
        errors = self.mgr.status().get("errors")
        if errors:
            raise RuntimeError(f"syncckpt: {errors}")

    def close(self) -> None:
        self.mgr.close()

    def resume(self, model, opt, scratch: Path) -> None:
        t0 = time.perf_counter()
        mgr = CheckpointManager(
            scratch / "ckpt",
            save_every_n_steps=None,
            remote=self.url,
            storage_options=self.options,
            handle_sigterm=False,
        )
        try:
            mgr.register(model=model, optimizer=opt)
            self.setup_s.append(time.perf_counter() - t0)  # the manager's setup (lease) before resume()
            info = mgr.resume()
        finally:
            mgr.close()
        if info is None or info.global_step != self.last:
            raise RuntimeError(f"syncckpt resume() found {info}, expected step {self.last}")

    def prune(self, fs: Any) -> None:
        pass


def scramble(model, opt) -> None:
    """Overwrite the resume target so a loader that skipped a tensor would be caught."""
    with torch.no_grad():
        for t in state_tensors(model, opt):
            t.fill_(-7.0)


def same_state(a: tuple, b: tuple) -> bool:
    ta, tb = state_tensors(*a), state_tensors(*b)
    return len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb, strict=True))


def rotated(items: list[str], rep: int) -> list[str]:
    """Rotated by ``rep``, and reversed every other round, so no method always follows the same one."""
    order = items[rep % len(items) :] + items[: rep % len(items)]
    return order[::-1] if rep % 2 else order


def measure_save(peer: Any, step: int, server_pid: int | None) -> dict[str, float]:
    settle(server_pid)
    s0 = cpu_seconds(server_pid) if server_pid else 0.0
    c0 = process_cpu_seconds()
    t0 = time.perf_counter()
    handle = peer.start(step)
    t1 = time.perf_counter()
    peer.finish(handle)
    t2 = time.perf_counter()
    c1 = process_cpu_seconds()
    return {
        "stall_s": t1 - t0,
        "durable_s": t2 - t0,
        "cpu_s": c1 - c0,
        "server_cpu_s": (cpu_seconds(server_pid) - s0) if server_pid else 0.0,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - {"dcp", "torch", "syncckpt"})
    if unknown:
        sys.exit(f"unknown methods {unknown}; choose from dcp, torch, syncckpt")
    server_cpus = isolate_benchmark(args.isolate_server)  # before torch's threads start: they inherit it
    model, opt = build_mlp(args.size)
    target = build_mlp(args.size)
    nbytes = state_bytes(model, opt)
    gb = nbytes / 1e9
    root = Path(tempfile.mkdtemp(prefix="syncckpt-bench-peers-"))
    saves: dict[str, list[dict[str, float]]] = {m: [] for m in ["copy", *methods]}
    first: dict[str, dict[str, float]] = {}
    resumes: dict[str, list[float]] = {m: [] for m in methods}
    verified: dict[str, bool | str] = {}
    try:
        with moto_s3(tls=args.https) as s3:
            pin_server(s3.pid, server_cpus)
            options = s3.options()
            fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
            base = unique_prefix("s3", "peers")
            peers: dict[str, Any] = {"copy": WarmCopy(model, opt)}
            if "dcp" in methods:
                peers["dcp"] = Dcp(model, opt, f"{base}/dcp", options)
            if "torch" in methods:
                peers["torch"] = TorchSavePut(model, opt, f"{base}/torch", options, root / "torch")
            if "syncckpt" in methods:
                peers["syncckpt"] = Syncckpt(
                    model, opt, f"{base}/syncckpt", options, root / "syncckpt", args.background_nice
                )
            names = list(peers)
            step = 1
            for name in names:  # warm-up: first call of each (allocations, connections, code paths)
                first[name] = measure_save(peers[name], step, s3.pid)
            for rep in range(args.repeat):
                step += 1
                mlp_step(model, opt, seed=step)  # the state changes between checkpoints, as in training
                for name in rotated(names, rep):
                    sample = measure_save(peers[name], step, s3.pid)
                    saves[name].append(sample)
                    print(
                        f"  save {name:9s} stall {sample['stall_s']:.3f}s  durable {sample['durable_s']:.2f}s  "
                        f"cpu {sample['cpu_s']:.2f}s",
                        flush=True,
                    )
                for name in names:
                    if hasattr(peers[name], "prune"):
                        peers[name].prune(fs)
            if "syncckpt" in peers:
                peers["syncckpt"].close()  # releases the run's lease: the fresh sessions below take it
            for rep in range(args.repeat):
                for name in rotated(methods, rep):
                    scratch = root / f"resume-{name}-{rep}"
                    scratch.mkdir()
                    scramble(*target)
                    settle(s3.pid)
                    t0 = time.perf_counter()
                    peers[name].resume(*target, scratch)
                    elapsed = time.perf_counter() - t0
                    resumes[name].append(elapsed)
                    ok: bool | str = "download only" if name == "torch" else same_state(target, (model, opt))
                    if ok is False:
                        raise RuntimeError(f"{name}: the resumed state differs from the saved one")
                    verified[name] = ok
                    print(f"  resume {name:9s} {elapsed:.2f}s  identical: {ok}", flush=True)
                    shutil.rmtree(scratch)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {**summarise(args, model, nbytes, gb, saves, first, resumes, verified), **breakdown(peers.get("syncckpt"))}


def breakdown(peer: Syncckpt | None) -> dict[str, float]:
    """syncckpt's time to durable up to the local commit, and its fresh session's setup before resume()."""
    out = {}
    if peer is not None and peer.local_commit_s[1:]:  # [0] is the warm-up save
        out["syncckpt_local_commit_s"] = statistics.median(peer.local_commit_s[1:])
    if peer is not None and peer.setup_s:
        out["syncckpt_resume_setup_s"] = statistics.median(peer.setup_s)
    return out


def med(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples) if samples else float("nan")


def summarise(args, model, nbytes, gb, saves, first, resumes, verified) -> dict[str, Any]:
    rows = []
    for name, samples in saves.items():
        row = {
            "method": LABELS[name],
            "stall_s": med(samples, "stall_s"),
            "first_stall_s": first[name]["stall_s"],
            "durable_s": None if name == "copy" else med(samples, "durable_s"),
            "resume_s": statistics.median(resumes[name]) if resumes.get(name) else None,
            "cpu_s_per_GB": None if name == "copy" else med(samples, "cpu_s") / gb,
            "server_cpu_s": None if name == "copy" else med(samples, "server_cpu_s"),
            "n": len(samples),
        }
        rows.append(row)
    by = {r["method"]: r for r in rows}
    copy_stall = by[LABELS["copy"]]["stall_s"]
    dcp = by.get(LABELS["dcp"])
    for r in rows:
        r["stall_x_copy"] = ratio(r["stall_s"], copy_stall)
        if dcp is not None:
            r["stall_x_dcp"] = ratio(r["stall_s"], dcp["stall_s"])
            if r["durable_s"] is not None:
                r["durable_x_dcp"] = ratio(r["durable_s"], dcp["durable_s"])
            if r["resume_s"] is not None:
                r["resume_x_dcp"] = ratio(r["resume_s"], dcp["resume_s"])
    targets = {}
    sc = by.get(LABELS["syncckpt"])
    if sc is not None:
        targets = {
            "stall <= 1.2x warm copy": sc["stall_x_copy"] <= 1.2,
            "stall <= 0.8x DCP blocking": bool(dcp) and sc["stall_x_dcp"] <= 0.8,
            "time to durable <= 0.75x DCP": bool(dcp) and sc["durable_x_dcp"] <= 0.75,
            "resume <= 0.6x DCP load": bool(dcp) and sc["resume_x_dcp"] <= 0.6,
            "<= 2.0 CPU-s per GB mirrored": sc["cpu_s_per_GB"] <= 2.0,
        }
    return {
        "params": n_params(model),
        "state_bytes": nbytes,
        "size_m": args.size,
        "background_nice": args.background_nice,
        "repeat": args.repeat,
        "load_average_end": load_average(),
        "rows": rows,
        "targets": targets,
        "verified": verified,
        "samples": saves,
        "first_call": first,
        "resume_samples": resumes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=16.0, help="millions of parameters (fp32 + AdamW: 12 B each)")
    ap.add_argument("--repeat", type=int, default=3, help="measured rounds (after one warm-up round)")
    ap.add_argument("--methods", default="dcp,torch,syncckpt", help="comma-separated: dcp, torch, syncckpt")
    ap.add_argument(
        "--background-nice",
        type=int,
        default=19,
        help="syncckpt's background_nice (19, its default: its threads yield to every other process, as they do "
        "to training; on a machine busy with other jobs that stretches its time to durable)",
    )
    ap.add_argument(
        "--isolate-server",
        action="store_true",
        help="moto on the last CPU, the benchmark (every method alike) on the others: a real store is not on the "
        "training machine's CPUs",
    )
    ap.add_argument(
        "--https",
        action="store_true",
        help="moto over https (its own CA, trusted by every method): the transport of a real store, where TLS "
        "protects the bytes and syncckpt's uploads carry no second hash",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load0 = load_average()
    result = run(args)
    title = (
        f"Peers, same moto S3{' over https' if args.https else ''}, same run: "
        f"{result['params'] / 1e6:.1f}M params + AdamW = "
        f"{result['state_bytes'] / 1e9:.3f} GB, {os.cpu_count()} CPUs, load {load0:.1f} -> "
        f"{result['load_average_end']:.1f}, median of {args.repeat} rounds (rotated order)"
    )
    columns = ["method", "stall_s", "first_stall_s", "stall_x_copy", "stall_x_dcp", "durable_s", "durable_x_dcp"]
    columns += ["resume_s", "resume_x_dcp", "cpu_s_per_GB", "server_cpu_s", "n"]
    print_table(title, result["rows"], columns)
    verdicts = "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in result["targets"].items())
    print(f"\nissue 19 targets (syncckpt): {verdicts}")
    if "syncckpt_local_commit_s" in result:
        print(
            f"syncckpt time to durable, split: committed on local disk after "
            f"{result['syncckpt_local_commit_s']:.2f}s (median), the rest is the mirror"
        )
    if "syncckpt_resume_setup_s" in result:
        print(f"syncckpt resume_s includes {result['syncckpt_resume_setup_s']:.2f}s of manager setup (lease write)")
    print("torch.save resume = s3fs get only (no torch.load: never unpickled here), a lower bound for that method")
    name = ("peers_isolated" if args.isolate_server else "peers") + ("_https" if args.https else "")
    path = write_json(
        name, {"load_average_start": load0, "isolate_server": args.isolate_server, "https": args.https, **result}
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
