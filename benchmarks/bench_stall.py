"""How long does the training loop stall when a checkpoint is due?

Compares, in one run on one machine (ratios matter, not absolute seconds):
  * syncckpt ``step()`` blocking time on a due save (warm: staging buffers already allocated),
  * a warm in-memory copy of the same state: ``copy_`` of every tensor into tensors allocated and touched
    beforehand (the physical floor),
  * synchronous ``torch.save`` of the same state to local disk,
  * ``torch.distributed.checkpoint.async_save`` blocking time (gloo, world size 1), first call and later calls.

The copy and ``step()`` are measured under the same conditions: both right after ``mgr.wait()`` returned (no
background write, hash or fsync of the previous save running), in interleaved rounds whose order alternates;
medians. (An earlier version timed the copy while the previous save's writer thread was still running, which
slowed the baseline and flattered the ratio.)

Usage:  python benchmarks/bench_stall.py [--repeat 7] [--layers 12 | --size M] [--no-dcp]
Writes benchmarks/results/stall.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import build_mlp, build_model, n_params, print_table, state_bytes, summary, timeit, write_json  # noqa: E402

from syncckpt import CheckpointManager  # noqa: E402


def warm_copy_fn(model, opt):
    """Copy every tensor of the state into buffers allocated (and touched) beforehand."""

    def tensors():
        out = list(model.state_dict().values())
        for st in opt.state_dict()["state"].values():
            out.extend(v for v in st.values() if isinstance(v, torch.Tensor))
        return out

    bufs = [torch.empty_like(t).zero_() for t in tensors()]

    def run():
        for b, t in zip(bufs, tensors(), strict=True):
            b.copy_(t)

    return run


def dcp_async(model, opt, root: Path, repeat: int) -> list[float] | None:
    try:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
    except ImportError:
        return None
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    times, futures = [], []
    for i in range(repeat):
        state = {"model": model.state_dict(), "optim": opt.state_dict()}
        t0 = time.perf_counter()
        fut = dcp.async_save(state, checkpoint_id=str(root / f"dcp-{i}"))
        times.append(time.perf_counter() - t0)
        fut.result()
        futures.append(fut)
    dist.destroy_process_group()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--layers", type=int, default=12, help="transformer layers (common.build_model)")
    ap.add_argument("--size", type=float, default=None, help="instead: a Linear stack of M million parameters")
    ap.add_argument("--no-dcp", action="store_true")
    args = ap.parse_args()

    model, opt = build_model(layers=args.layers) if args.size is None else build_mlp(args.size)
    nbytes = state_bytes(model, opt)
    root = Path(tempfile.mkdtemp(prefix="syncckpt-bench-"))
    try:
        warm_copy = warm_copy_fn(model, opt)
        warm_copy()  # touch the floor's buffers once too

        mgr = CheckpointManager(root / "ckpt", save_every_n_steps=1, keep_last=1, handle_sigterm=False)
        mgr.register(model=model, optimizer=opt)
        mgr.step(1, epoch=0, batch_idx=0)  # first save allocates the staging buffers
        mgr.wait()
        # Both measured under the same conditions: after wait() (the writer thread idle: no hashing, writing or
        # fsync of the previous save competing for the CPUs and memory), in interleaved rounds whose order
        # alternates (copy first, then step() first), on a shared, noisy host; medians.
        warm, stalls, background = [], [], []
        for i in range(args.repeat):
            for arm in ("copy", "step") if i % 2 == 0 else ("step", "copy"):
                t_wait = time.perf_counter()
                mgr.wait()
                background.append(time.perf_counter() - t_wait)
                if arm == "copy":
                    warm.extend(timeit(warm_copy, 1))
                else:
                    t0 = time.perf_counter()
                    assert mgr.step(i + 2, epoch=0, batch_idx=i + 1)
                    stalls.append(time.perf_counter() - t0)
        t_wait = time.perf_counter()
        mgr.wait()
        background.append(time.perf_counter() - t_wait)
        background_s = max(background)
        mgr.close()

        def torch_save():
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, root / "torch.pt")
            with open(root / "torch.pt", "rb+") as f:
                os.fsync(f.fileno())

        tsave = timeit(torch_save, max(2, args.repeat // 2))
        dcp_times = None if args.no_dcp else dcp_async(model, opt, root, max(2, args.repeat // 2))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    w = summary(warm)["median_s"]
    rows = [
        {"method": "warm in-memory copy (floor)", **summary(warm), "x_warm_copy": 1.0},
        {"method": "syncckpt step() on a due save", **summary(stalls), "x_warm_copy": summary(stalls)["median_s"] / w},
        {"method": "torch.save (sync, fsync)", **summary(tsave), "x_warm_copy": summary(tsave)["median_s"] / w},
    ]
    if dcp_times:
        rows.append(
            {
                "method": "DCP async_save, first call",
                "median_s": dcp_times[0],
                "min_s": dcp_times[0],
                "max_s": dcp_times[0],
                "n": 1,
                "x_warm_copy": dcp_times[0] / w,
            }
        )
        later = dcp_times[1:]
        rows.append(
            {"method": "DCP async_save, later calls", **summary(later), "x_warm_copy": summary(later)["median_s"] / w}
        )
    title = (
        f"Stall on a due checkpoint: {n_params(model) / 1e6:.0f}M params + AdamW = {nbytes / 1e9:.2f} GB of "
        f"state, {os.cpu_count()} CPUs (longest wait() for a save's background write+hash+fsync: {background_s:.2f}s)"
    )
    print_table(title, rows, ["method", "median_s", "min_s", "max_s", "n", "x_warm_copy"])
    path = write_json(
        "stall", {"params": n_params(model), "state_bytes": nbytes, "rows": rows, "background_write_s": background_s}
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
