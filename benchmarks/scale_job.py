"""The training job of bench_scale.py: DDP on gloo (CPU) over torchrun "nodes", each node with its own checkpoint
directory, mirrored node-local to S3 (every node's first rank uploads its part, rank 0 commits).

A Linear stack (``--width`` x ``--layers``) trains for ``--steps`` optimizer steps with a step checkpoint every
``--save-every`` steps, each waited for (``mgr.wait()``), so the saves go one after another and their requests do
not overlap. Rank 0 prints one ``mark JSON`` line per event, with ``time.time()`` stamps the benchmark lines up with
its proxy's request log:

- ``{"event": "save", "name": ..., "start": t, "end": t}``: from the moment every rank reached the save (a
  barrier) until rank 0's ``wait()`` returned (the checkpoint is committed: manifest, LATEST, retention);
- ``{"event": "resumed", "step": N, "end": t}``: every rank has resumed (a barrier after ``resume()``);
- ``{"event": "done", "step": N, "end": t}``: the loop is over, before ``close()``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from syncckpt import CheckpointManager, ResumableSampler


def mark(event: str, **fields: object) -> None:
    """One write per line: several ranks share the node's pipe."""
    os.write(1, ("mark " + json.dumps({"event": event, **fields}) + "\n").encode())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--remote", required=True)
    p.add_argument("--storage-options", required=True, help="JSON; each node gets its own endpoint")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    leader = os.environ.get("LOCAL_RANK") == "0"
    logging.basicConfig(
        level=logging.INFO if leader else logging.WARNING,
        stream=sys.stdout,
        format=f"[rank{rank}] %(levelname)s %(message)s",
        force=True,
    )
    g = torch.Generator().manual_seed(7)
    batch = 4
    x = torch.randn(batch * world * 4, args.width, generator=g)
    ds = TensorDataset(x, x.sum(1, keepdim=True))
    torch.manual_seed(100 + rank)
    net = torch.nn.Sequential(*(torch.nn.Linear(args.width, args.width) for _ in range(args.layers)))
    model = DistributedDataParallel(net)
    sampler = ResumableSampler(ds, batch_size=batch, shuffle=True, seed=3)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr = CheckpointManager(
        args.ckpt_dir,
        save_every_n_steps=args.save_every,
        keep_last=2,
        remote=args.remote,
        storage_options=json.loads(args.storage_options),
        grace_period=30,
        handle_sigterm=False,
    )
    mgr.register(model=model, optimizer=opt, sampler=sampler)
    info = mgr.resume()
    step = info.global_step if info else 0
    dist.barrier()
    if rank == 0 and info is not None:
        mark("resumed", step=step, end=time.time())
    epoch = info.epoch if info else 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        first = info.batch_idx + 1 if info and epoch == info.epoch else 0
        for batch_idx, (xb, yb) in enumerate(loader, start=first):
            loss = torch.nn.functional.mse_loss(model(xb)[:, :1], yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            due = step % args.save_every == 0
            if due:
                dist.barrier()
            start = time.time()
            if mgr.step(step, epoch=epoch, batch_idx=batch_idx):
                mgr.wait()
                if rank == 0:
                    mark("save", name=f"checkpoint-step-{step}", start=start, end=time.time())
            if step >= args.steps:
                break
        epoch += 1
    if rank == 0:
        mark("done", step=step, end=time.time())
    mgr.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    os._exit(status)  # skip torch's interpreter teardown (seconds on 2 busy cores)
