"""How much training throughput does checkpointing every 30 s, mirrored to S3, cost?

A real training loop (forward, backward, AdamW on the benchmark transformer, small batch) runs in rounds of one
block per arm, in alternating order (A B B A ..., or A B C C B A ... with two checkpointing arms): A trains
without checkpointing, B (and C) call ``CheckpointManager.step()`` after every optimizer step with
``save_every_n_minutes = every / 60`` and a remote on a moto S3 server (a child process). Each checkpointing block
holds exactly one save and the whole period after it (it ends when the next save would be due), so the save's
stall, its background write + hash + fsync and its upload all fall inside the measured time; a block starts
after the previous one's upload finished, so no background work leaks into another block. The first save of each
manager (staging buffer allocation, first upload) happens before the measured blocks.

``--background-nice 19,0`` gives one checkpointing arm per value (a manager each, with its own folder and run
prefix) in the same run, so the priorities are compared under the same machine load.

Target: steps/s with checkpointing >= 0.95 x steps/s without. CPU seconds per step (this process + the moto server)
are shown too: on a 2-core machine the S3 server's own work competes with training, which a real remote does not.

``--peers`` adds two arms saving to the same S3 server at the same interval, in the same rounds: DCP
``async_save`` + ``FsspecWriter`` (4 threads) and ``torch.save`` + an s3fs ``put`` thread (``bench_peers.py``'s).

``--isolate-server`` gives the S3 server a CPU of its own (the last one) and the training loop the others, with
as many torch threads: the store's work then runs off the training cores, as a real remote's does, while
syncckpt's own background threads may still run anywhere. All arms use the same pinning.

Usage:  python benchmarks/bench_overhead.py [--layers 12] [--duration 120] [--every-seconds 30] [--batch 2]
                                           [--threads N] [--background-nice N[,N]] [--isolate-server]
                                           [--remote s3|none] [--pin-background] [--peers]
Writes benchmarks/results/overhead[_isolated][_pinned][_local][_niceN_N][_peers].json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_peers import Dcp, TorchSavePut  # noqa: E402
from common import (  # noqa: E402
    build_model,
    cpu_seconds,
    make_tokens,
    moto_s3,
    n_params,
    pin_server,
    print_table,
    ratio,
    split_cpus,
    state_bytes,
    train_step,
    unique_prefix,
    write_json,
)

from syncckpt import CheckpointManager  # noqa: E402


def block_order(arms: list[str], n: int) -> list[list[str]]:
    """n rounds holding one block per arm, in forward then reversed order (A B B A, or A B C C B A): balanced
    against slow drifts of the machine's load."""
    return [list(arms) if i % 2 == 0 else list(reversed(arms)) for i in range(n)]


def background_tids() -> list[int]:
    """syncckpt's writer, uploader and lease threads and fsspec's IO loop (and its executor): the threads that do a
    checkpoint's background work. Threads they start later (transfer pools) inherit their priority and CPU mask."""
    return [
        t.native_id
        for t in threading.enumerate()
        if t.name.startswith(("syncckpt-", "fsspecIO", "asyncio_")) and t.native_id
    ]


def training_cpu_seconds() -> float:
    """CPU seconds of the training loop's threads: this (main) thread and torch's intra-op pool, i.e. every thread
    of this process that Python's threading does not know (syncckpt's and fsspec's threads are Python threads).
    The rest of the process's CPU time is background work."""
    python_threads = {t.native_id for t in threading.enumerate()} - {threading.get_native_id()}
    total = 0.0
    for tid in map(int, os.listdir("/proc/self/task")):
        if tid not in python_threads:
            with contextlib.suppress(FileNotFoundError):  # a thread that ended since the listing
                total += cpu_seconds(tid=tid)
    return total


class PeerArm:
    """A peer of ``bench_peers.py`` (DCP async_save, torch.save + put) driven as the loop drives a manager:
    ``step()`` saves once ``every`` seconds have passed since its last save; a save still running then is waited
    for first (DCP allows one at a time, and a put thread is joined), on the training thread."""

    def __init__(self, peer: Any, every: float) -> None:
        self.peer, self.every = peer, every
        self.pending: Any = None
        self.last = time.monotonic()

    def save(self, step: int, epoch: int = 0, batch_idx: int = 0) -> bool:
        self.wait()
        self.pending = self.peer.start(step)
        self.last = time.monotonic()
        return True

    def step(self, step: int, epoch: int = 0, batch_idx: int = 0) -> bool:
        return time.monotonic() - self.last >= self.every and self.save(step)

    def wait(self) -> bool:
        if self.pending is not None:
            self.peer.finish(self.pending)
            self.pending = None
        return True

    def status(self) -> dict[str, Any]:
        return {"mirrored_history": list(getattr(self.peer, "saved", []))}

    def close(self, timeout: float | None = None) -> None:
        self.wait()


def server_cpu(s3) -> float:
    return cpu_seconds(s3.pid) if s3 is not None else 0.0


def run_blocks(
    managers: dict[str, CheckpointManager],
    model,
    opt,
    tokens,
    every: float,
    n_rounds: int,
    s3,
    blocks: list[dict],
    train_cpus: set[int] | None = None,
    background_cpus: set[int] | None = None,
) -> dict[str, dict]:
    """The measured blocks. ``managers`` maps each checkpointing arm to its manager (the arm "none" has none).
    Returns per arm: the first save's stall, its time until mirrored, and the mirrored names."""
    first = {}
    for arm, mgr in managers.items():
        t0 = time.perf_counter()
        mgr.save(0, epoch=0, batch_idx=0)
        stall = time.perf_counter() - t0
        mgr.wait()
        first[arm] = {"first_stall_s": stall, "first_mirrored_s": time.perf_counter() - t0}
    if background_cpus:
        for tid in background_tids():
            os.sched_setaffinity(tid, background_cpus)
        print(f"  pinned syncckpt's background threads to CPU {sorted(background_cpus)}", flush=True)
    if train_cpus:
        # Only this (the training) thread: syncckpt's writer, uploader and IO threads exist already and keep every
        # CPU, and the pools the uploader starts inherit its mask, not this one.
        os.sched_setaffinity(0, train_cpus)

    step = 0
    for rnd, arms in enumerate(block_order(["none", *managers], n_rounds)):
        for arm in arms:
            mgr = managers.get(arm)
            steps, stall, saves, last_save = 0, 0.0, 0, 0.0
            cpu0, srv0, train0 = cpu_seconds(), server_cpu(s3), training_cpu_seconds()
            start = time.monotonic()
            while mgr is not None or time.monotonic() - start < every:
                train_step(model, opt, tokens)
                step += 1
                steps += 1
                if mgr is not None:
                    t = time.monotonic()
                    if saves and t - last_save >= every:
                        break  # this step would start the next save: the block holds exactly one period
                    if mgr.step(step, epoch=0, batch_idx=step):
                        stall += time.monotonic() - t
                        last_save = t  # <= the manager's own timestamp, so we stop no later than it would save
                        saves += 1
            elapsed = time.monotonic() - start
            t = time.perf_counter()
            if mgr is not None:
                mgr.wait()  # normally idle by now; if not, the background work is longer than the interval
            late = time.perf_counter() - t
            cpu, srv, train = cpu_seconds() - cpu0, server_cpu(s3) - srv0, training_cpu_seconds() - train0
            blocks.append(
                {
                    "round": rnd,
                    "arm": arm,
                    "steps": steps,
                    "seconds": elapsed,
                    "saves": saves,
                    "stall_s": stall,
                    "wait_after_block_s": late,
                    "cpu_s": cpu,
                    "server_cpu_s": srv,
                    "background_cpu_s": cpu - train,
                }
            )
            print(
                f"  {arm:7s} {steps:4d} steps in {elapsed:6.1f}s = {steps / elapsed:.3f} steps/s "
                f"(cpu: training {train:.1f}s + background {cpu - train:.1f}s + server {srv:.1f}s; "
                f"stall {stall:.2f}s, background left {late:.1f}s)",
                flush=True,
            )

    for arm, mgr in managers.items():
        first[arm]["mirrored"] = mgr.status().get("mirrored_history", [])
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of training per arm")
    ap.add_argument("--every-seconds", type=float, default=30.0, help="checkpoint interval (save_every_n_minutes*60)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument(
        "--background-nice",
        default=None,
        help="CheckpointManager(background_nice=N), or a comma-separated list (19,0) for one "
        "checkpointing arm per value in the same run; default: the manager's default (19)",
    )
    ap.add_argument(
        "--isolate-server",
        action="store_true",
        help="the S3 server on the last CPU, training (and its torch threads) on the others",
    )
    ap.add_argument(
        "--remote",
        choices=("s3", "none"),
        default="s3",
        help="mirror to a moto S3 server (the target's setting) or only commit locally",
    )
    ap.add_argument(
        "--pin-background",
        action="store_true",
        help="with --isolate-server: syncckpt's background threads on the last CPU too (with --remote "
        "none: the write path on a spare core, as beside a GPU training loop)",
    )
    ap.add_argument(
        "--peers",
        action="store_true",
        help="two more arms, to the same S3 server: DCP async_save + FsspecWriter x4, and torch.save + an s3fs "
        "put thread (bench_peers.py's), every --every-seconds",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    server_cpus, train_cpus = split_cpus(args.isolate_server)
    if args.threads or train_cpus:
        torch.set_num_threads(args.threads or len(train_cpus))
    every = args.every_seconds
    n_blocks = max(1, round(args.duration / every))
    model, opt = build_model(layers=args.layers)
    nbytes = state_bytes(model, opt)
    tokens = make_tokens(args.batch, args.seq, vocab=model[-1].out_features)
    for _ in range(2):
        train_step(model, opt, tokens)

    root = Path(tempfile.mkdtemp(prefix="syncckpt-bench-"))
    nices = [None] if args.background_nice is None else [int(v) for v in args.background_nice.split(",")]
    arms = {("ckpt" if n is None else f"nice{n}"): n for n in nices}
    blocks: list[dict] = []
    try:
        with moto_s3() if args.remote == "s3" else contextlib.nullcontext() as s3, contextlib.ExitStack() as stack:
            if server_cpus and s3 is not None:
                pin_server(s3.pid, server_cpus)
            managers = {}
            for arm, nice in arms.items():
                mgr = CheckpointManager(
                    root / arm,
                    save_every_n_steps=None,
                    save_every_n_minutes=every / 60,
                    keep_last=1,
                    remote=unique_prefix("s3", "overhead") if s3 else None,
                    storage_options=s3.options() if s3 else None,
                    on_upload_error="raise",
                    handle_sigterm=False,
                    **({} if nice is None else {"background_nice": nice}),
                )
                stack.callback(mgr.close, timeout=600)
                mgr.register(model=model, optimizer=opt)
                managers[arm] = mgr
            if args.peers and s3 is not None:
                dcp = Dcp(model, opt, unique_prefix("s3", "overhead-dcp"), s3.options())
                put = TorchSavePut(model, opt, unique_prefix("s3", "overhead-put"), s3.options(), root / "put")
                managers["dcp"], managers["put"] = PeerArm(dcp, every), PeerArm(put, every)
            first = run_blocks(
                managers,
                model,
                opt,
                tokens,
                every,
                n_blocks,
                s3,
                blocks,
                train_cpus,
                server_cpus if args.pin_background else None,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    where = " -> moto S3" if args.remote == "s3" else ", local only"
    labels = {"none": "no checkpointing"}
    for arm, nice in arms.items():
        labels[arm] = f"checkpoint every {every:.0f}s{where}" + ("" if nice is None else f", background_nice={nice}")
    if args.peers and args.remote == "s3":
        labels["dcp"] = f"DCP async_save + FsspecWriter x4 every {every:.0f}s{where}"
        labels["put"] = f"torch.save + s3fs put thread every {every:.0f}s{where}"
    rows = []
    for arm, label in labels.items():
        bs = [b for b in blocks if b["arm"] == arm]
        steps, secs, saves = sum(b["steps"] for b in bs), sum(b["seconds"] for b in bs), sum(b["saves"] for b in bs)
        rows.append(
            {
                "arm": label,
                "blocks": len(bs),
                "steps": steps,
                "seconds": secs,
                "steps_per_s": steps / secs,
                "cpu_s_per_step": sum(b["cpu_s"] for b in bs) / steps,
                "server_cpu_s_per_step": sum(b["server_cpu_s"] for b in bs) / steps,
                "saves": saves,
                "bg_cpu_s_per_save": sum(b["background_cpu_s"] for b in bs) / saves if saves else None,
                "bg_left_s": max(b["wait_after_block_s"] for b in bs),
            }
        )
    base = rows[0]["steps_per_s"]
    for r in rows:
        r["x_no_ckpt"] = r["steps_per_s"] / base
    # Blocks of one round saw the same machine load: their ratios are less sensitive to drift than the pooled one.
    none_speed = {b["round"]: b["steps"] / b["seconds"] for b in blocks if b["arm"] == "none"}
    results = {}
    for arm, row in zip(list(labels)[1:], rows[1:], strict=True):
        bs = [b for b in blocks if b["arm"] == arm]
        paired = [ratio(b["steps"] / b["seconds"], none_speed[b["round"]]) for b in bs]
        # If a save's background work outlasts the interval, what is left runs while training waits between
        # blocks; charging all of it to training gives a lower bound (a real run would skip a step checkpoint).
        pessimistic = sum(b["steps"] for b in bs) / sum(b["seconds"] + b["wait_after_block_s"] for b in bs) / base
        results[arm] = {
            **first[arm],
            "label": row["arm"],
            "ratio": row["x_no_ckpt"],
            "paired_ratios": paired,
            "ratio_pessimistic": pessimistic,
            "bg_left_s": row["bg_left_s"],
            "stall_median_s": statistics.median(b["stall_s"] for b in bs),
        }
    title = (
        f"Training overhead: {n_params(model) / 1e6:.0f}M params + AdamW = {nbytes / 1e9:.2f} GB of state, "
        f"batch {args.batch}x{args.seq}, {torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs, "
        f"{n_blocks} x {every:.0f}s blocks per arm (rounds A B ... B A), target >= 0.95"
        + (f"; S3 server pinned to CPU {sorted(server_cpus)}, training to {sorted(train_cpus)}" if server_cpus else "")
        + ("; syncckpt's background threads pinned with the server" if args.pin_background else "")
    )
    print_table(
        title,
        rows,
        [
            "arm",
            "blocks",
            "steps",
            "seconds",
            "steps_per_s",
            "cpu_s_per_step",
            "server_cpu_s_per_step",
            "saves",
            "bg_cpu_s_per_save",
            "bg_left_s",
            "x_no_ckpt",
        ],
    )
    for r in results.values():
        print(f"\n{r['label']}:")
        paired = r["paired_ratios"]
        print(
            f"  ratio to the no-checkpointing block of the same round: median {statistics.median(paired):.3f} "
            f"({', '.join(f'{p:.3f}' for p in paired)})"
        )
        print(
            f"  stall per save: median {r['stall_median_s']:.3f}s; first save: {r['first_stall_s']:.2f}s stall, "
            f"{r['first_mirrored_s']:.1f}s until mirrored; mirrored {len(r['mirrored'])} checkpoints"
        )
        print(
            f"  background work still running at a block's end: max {r['bg_left_s']:.1f}s "
            f"(ratio if it were all charged to training: {r['ratio_pessimistic']:.3f})"
        )
    name = "overhead_isolated" if server_cpus else "overhead"
    name += "_pinned" if args.pin_background else ""
    name += "_local" if args.remote == "none" else ""
    name += "_nice" + "_".join(str(n) for n in nices) if args.background_nice is not None else ""
    name += "_peers" if args.peers else ""
    path = write_json(
        name,
        {
            "params": n_params(model),
            "state_bytes": nbytes,
            "every_s": every,
            "rows": rows,
            "blocks": blocks,
            "arms": {arm: {k: v for k, v in r.items() if k != "mirrored"} for arm, r in results.items()},
            "torch_threads": torch.get_num_threads(),
            "isolate_server": bool(server_cpus),
            "pin_background": args.pin_background,
            "remote": args.remote,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
