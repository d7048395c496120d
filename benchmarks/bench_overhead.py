"""How much training throughput does checkpointing every 30 s, mirrored to S3, cost?

A real training loop (forward, backward, AdamW on the benchmark transformer, small batch) runs in blocks that
alternate A B B A ...: A trains without checkpointing, B calls ``CheckpointManager.step()`` after every optimizer
step with ``save_every_n_minutes = every / 60`` and a remote on a moto S3 server (a child process). Each B block
holds exactly one save and the whole period after it (it ends when the next save would be due), so the save's
stall, its background write + hash + fsync and its upload all fall inside the measured time; a B block starts
after the previous one's upload finished, so no background work leaks into an A block. The first save (staging
buffer allocation, first upload) happens before the measured blocks.

Target: steps/s with checkpointing >= 0.95 x steps/s without. CPU seconds per step (this process + the moto server)
are shown too: on a 2-core machine the S3 server's own work competes with training, which a real remote does not.

``--isolate-server`` gives the S3 server a CPU of its own (the last one) and the training loop the others, with
as many torch threads: the store's work then runs off the training cores, as a real remote's does, while
syncckpt's own background threads may still run anywhere. Both arms use the same pinning.

Usage:  python benchmarks/bench_overhead.py [--layers 12] [--duration 120] [--every-seconds 30] [--batch 2]
                                           [--threads N] [--background-nice 19] [--isolate-server]
Writes benchmarks/results/overhead.json (overhead_isolated.json with --isolate-server) and prints a table.
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

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    build_model,
    cpu_seconds,
    make_tokens,
    moto_s3,
    n_params,
    print_table,
    ratio,
    state_bytes,
    train_step,
    unique_prefix,
    write_json,
)

from syncckpt import CheckpointManager  # noqa: E402


def block_order(n: int) -> list[str]:
    """A B B A A B B A ...: n blocks per arm, balanced against slow drifts of machine load."""
    pairs = [("none", "ckpt") if i % 2 == 0 else ("ckpt", "none") for i in range(n)]
    return [arm for pair in pairs for arm in pair]


def background_tids() -> list[int]:
    """syncckpt's writer, uploader and lease threads and fsspec's IO loop (and its executor): the threads that do a
    checkpoint's background work. Threads they start later (transfer pools) inherit their priority and CPU mask."""
    return [t.native_id for t in threading.enumerate()
            if t.name.startswith(("syncckpt-", "fsspecIO", "asyncio_")) and t.native_id]


def renice_background(nice: int, server_pid: int | None) -> int:
    """Lower the CPU priority of syncckpt's background threads (and of their future children, which inherit it)
    and of every thread of the S3 server process: an experiment for what a lower-priority writer/uploader would
    give the training loop. Returns the number of threads changed."""
    tids = background_tids()
    if server_pid:
        tids += [int(tid) for tid in os.listdir(f"/proc/{server_pid}/task")]
    for tid in tids:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    return len(tids)


def pin_server(pid: int, cpus: set[int]) -> None:
    """Pin every thread of the server process (threads it starts later inherit the mask)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def server_cpu(s3) -> float:
    return cpu_seconds(s3.pid) if s3 is not None else 0.0


def run_blocks(mgr, model, opt, tokens, every: float, n_blocks: int, s3, blocks: list[dict], nice: int = 0,
               train_cpus: set[int] | None = None, background_cpus: set[int] | None = None):
    """The measured blocks; returns the first save's stall, its time until mirrored, and the mirrored names."""
    t0 = time.perf_counter()
    mgr.save(0, epoch=0, batch_idx=0)
    first_stall = time.perf_counter() - t0
    mgr.wait()
    first_total = time.perf_counter() - t0
    if nice:
        print(f"  reniced {renice_background(nice, s3 and s3.pid)} background and server threads to {nice}",
              flush=True)
    if background_cpus:
        for tid in background_tids():
            os.sched_setaffinity(tid, background_cpus)
        print(f"  pinned syncckpt's background threads to CPU {sorted(background_cpus)}", flush=True)
    if train_cpus:
        # Only this (the training) thread: syncckpt's writer, uploader and IO threads exist already and keep every
        # CPU, and the pools the uploader starts inherit its mask, not this one.
        os.sched_setaffinity(0, train_cpus)

    step = 0
    for arm in block_order(n_blocks):
        steps, stall, saves, last_save = 0, 0.0, 0, 0.0
        cpu0, srv0 = cpu_seconds(), server_cpu(s3)
        start = time.monotonic()
        while arm == "ckpt" or time.monotonic() - start < every:
            train_step(model, opt, tokens)
            step += 1
            steps += 1
            if arm == "ckpt":
                t = time.monotonic()
                if saves and t - last_save >= every:
                    break  # this step would start the next save: the block holds exactly one period
                if mgr.step(step, epoch=0, batch_idx=step):
                    stall += time.monotonic() - t
                    last_save = t  # <= the manager's own timestamp, so we stop no later than it would save
                    saves += 1
        elapsed = time.monotonic() - start
        cpu, srv = cpu_seconds() - cpu0, server_cpu(s3) - srv0
        t = time.perf_counter()
        mgr.wait()  # normally idle by now; if not, the background work is longer than the interval
        late = time.perf_counter() - t
        blocks.append({"arm": arm, "steps": steps, "seconds": elapsed, "saves": saves, "stall_s": stall,
                       "wait_after_block_s": late, "cpu_s": cpu, "server_cpu_s": srv})
        print(f"  {arm:4s} {steps:4d} steps in {elapsed:6.1f}s = {steps / elapsed:.3f} steps/s "
              f"(cpu {cpu:.1f}s + server {srv:.1f}s, stall {stall:.2f}s, background left {late:.1f}s)",
              flush=True)

    return first_stall, first_total, mgr.status().get("mirrored", [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of training per arm")
    ap.add_argument("--every-seconds", type=float, default=30.0, help="checkpoint interval (save_every_n_minutes*60)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--background-nice", type=int, default=0,
                    help="experiment: run syncckpt's background threads and the S3 server at this nice level")
    ap.add_argument("--isolate-server", action="store_true",
                    help="the S3 server on the last CPU, training (and its torch threads) on the others")
    ap.add_argument("--remote", choices=("s3", "none"), default="s3",
                    help="mirror to a moto S3 server (the target's setting) or only commit locally")
    ap.add_argument("--pin-background", action="store_true",
                    help="experiment (with --isolate-server): syncckpt's background threads on the server's CPU too")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, train_cpus = ({cpus[-1]}, set(cpus[:-1])) if args.isolate_server and len(cpus) > 1 else (None, None)
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
    blocks = []
    try:
        with moto_s3() if args.remote == "s3" else contextlib.nullcontext() as s3:
            if server_cpus and s3 is not None:
                pin_server(s3.pid, server_cpus)
            mgr = CheckpointManager(root / "ckpt", save_every_n_steps=None, save_every_n_minutes=every / 60,
                                    keep_last=1, remote=unique_prefix("s3", "overhead") if s3 else None,
                                    storage_options=s3.options() if s3 else None, on_upload_error="raise",
                                    handle_sigterm=False)
            try:
                mgr.register(model=model, optimizer=opt)
                first_stall, first_total, mirrored = run_blocks(mgr, model, opt, tokens, every, n_blocks, s3, blocks,
                                                                  args.background_nice, train_cpus,
                                                                  server_cpus if args.pin_background else None)
            finally:
                mgr.close(timeout=600)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = []
    for arm, label in (("none", "no checkpointing"), ("ckpt", f"checkpoint every {every:.0f}s"
                                                               + (" -> moto S3" if args.remote == "s3" else ", local only"))):
        bs = [b for b in blocks if b["arm"] == arm]
        steps, secs = sum(b["steps"] for b in bs), sum(b["seconds"] for b in bs)
        rows.append({"arm": label, "blocks": len(bs), "steps": steps, "seconds": secs, "steps_per_s": steps / secs,
                     "cpu_s_per_step": sum(b["cpu_s"] for b in bs) / steps,
                     "server_cpu_s_per_step": sum(b["server_cpu_s"] for b in bs) / steps,
                     "saves": sum(b["saves"] for b in bs),
                     "bg_left_s": max(b["wait_after_block_s"] for b in bs)})
    base = rows[0]["steps_per_s"]
    for r in rows:
        r["x_no_ckpt"] = r["steps_per_s"] / base
    # Adjacent A/B blocks saw the same machine load: their ratios are less sensitive to drift than the pooled one.
    paired = []
    for a, b in zip(blocks[::2], blocks[1::2], strict=True):
        n, c = (a, b) if a["arm"] == "none" else (b, a)
        paired.append(ratio(c["steps"] / c["seconds"], n["steps"] / n["seconds"]))
    stalls = [b["stall_s"] for b in blocks if b["arm"] == "ckpt"]
    # If a save's background work outlasts the interval, what is left runs while training waits between blocks;
    # charging all of it to training gives a lower bound (in a real run the uploader would skip a checkpoint).
    ckpt_blocks = [b for b in blocks if b["arm"] == "ckpt"]
    pessimistic = (sum(b["steps"] for b in ckpt_blocks)
                   / sum(b["seconds"] + b["wait_after_block_s"] for b in ckpt_blocks)) / rows[0]["steps_per_s"]
    ckpt = rows[1]
    title = (f"Training overhead: {n_params(model) / 1e6:.0f}M params + AdamW = {nbytes / 1e9:.2f} GB of state, "
             f"batch {args.batch}x{args.seq}, {torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs, "
             f"{n_blocks} x {every:.0f}s blocks per arm (A B B A), target >= 0.95"
             + (f"; background + server at nice {args.background_nice}" if args.background_nice else "")
             + (f"; S3 server pinned to CPU {sorted(server_cpus)}, training to {sorted(train_cpus)}"
                if server_cpus else "")
             + ("; syncckpt's background threads pinned with the server" if args.pin_background else ""))
    print_table(title, rows, ["arm", "blocks", "steps", "seconds", "steps_per_s", "cpu_s_per_step",
                              "server_cpu_s_per_step", "saves", "bg_left_s", "x_no_ckpt"])
    print(f"\nratio of adjacent block pairs: median {statistics.median(paired):.3f} "
          f"({', '.join(f'{p:.3f}' for p in paired)})")
    print(f"stall per save: median {statistics.median(stalls):.3f}s; first save: {first_stall:.2f}s stall, "
          f"{first_total:.1f}s until mirrored; mirrored {len(mirrored)} checkpoints")
    print(f"background work still running at a block's end: max {rows[1]['bg_left_s']:.1f}s (ratio if it were all "
          f"charged to training: {pessimistic:.3f})")
    name = "overhead_isolated" if server_cpus else "overhead"
    name += "_pinned" if args.pin_background else ""
    name += "_local" if args.remote == "none" else ""
    name += f"_nice{args.background_nice}" if args.background_nice else ""
    path = write_json(name, {
        "params": n_params(model), "state_bytes": nbytes, "every_s": every, "rows": rows, "blocks": blocks,
        "paired_ratios": paired, "ratio": ckpt["x_no_ckpt"], "ratio_pessimistic": pessimistic,
        "first_save_stall_s": first_stall, "first_save_mirrored_s": first_total,
        "background_nice": args.background_nice, "torch_threads": torch.get_num_threads(),
        "isolate_server": bool(server_cpus), "pin_background": args.pin_background,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
