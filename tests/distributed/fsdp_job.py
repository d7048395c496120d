"""An FSDP2 job for torchrun (gloo, CPU) using CheckpointManager exactly as a single-process script would.

Each optimizer step trains on data drawn from a generator seeded by (step, rank), so a resumed run sees the same
data as an uninterrupted one. ``--dump PATH`` writes the gathered (full) model and optimizer tensors at the end;
``--dump-after-resume PATH`` writes them right after resume() and exits (to check resharding, world 2 -> 1).
``--remote URL`` (with ``--storage-options JSON``) mirrors the checkpoints; ``--sync-saves`` waits after each due
save until it is committed and mirrored, before rank 0 prints ``step N``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from sharded_job import build, end_job, say  # noqa: E402  (the helper model sharded with fully_shard over a CPU mesh)

from syncckpt import CheckpointManager  # noqa: E402


def full_state(net, opt) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in net.state_dict().items():
        out[f"model.{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone().contiguous()
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            out[f"opt.{pid}.{k}"] = v.detach().reshape(-1).clone() if v.dim() == 0 else v.detach().clone().contiguous()
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--dump", default=None)
    p.add_argument("--dump-after-resume", default=None)
    p.add_argument("--remote", default=None)
    p.add_argument("--storage-options", default=None)
    p.add_argument("--sync-saves", action="store_true")
    p.add_argument("--hold-at", type=int, default=None, help="after step N, wait until killed (the test kills it)")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        stream=sys.stdout,
        format=f"[rank{rank}] %(levelname)s %(message)s",
        force=True,
    )
    net, opt = build(world)
    options = json.loads(args.storage_options) if args.storage_options else None
    mgr = CheckpointManager(
        args.ckpt_dir, save_every_n_steps=2, keep_last=2, remote=args.remote, storage_options=options
    )
    mgr.register(model=net, optimizer=opt)
    info = mgr.resume()
    if args.dump_after_resume:
        state = full_state(net, opt)
        if rank == 0:
            save_file(state, args.dump_after_resume)
            say(f"resumed at {info.global_step if info else 0}")
        mgr.close()
        dist.destroy_process_group()
        return 0
    step = info.global_step if info else 0
    while step < args.steps:
        g = torch.Generator().manual_seed(1000 * step + rank)
        loss = (net(torch.randn(6, 5, generator=g)) - 1.0).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if mgr.step(step, epoch=0, batch_idx=step - 1) and args.sync_saves:
            mgr.wait()
        if step == args.steps - 2 and args.dump:  # the state a later world-size-1 resume must see
            mgr.wait()
        if rank == 0:
            say(f"step {step}")
        if step == args.hold_at:
            threading.Event().wait()  # the killing test reads ahead of nothing: the job stops right here
    mgr.close()
    state = full_state(net, opt)
    if rank == 0 and args.dump:
        save_file(state, args.dump)
        say("done")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    end_job(main())
