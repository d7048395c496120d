"""A DDP job for torchrun (gloo, CPU) whose world size may change between a kill and the resume.

Every rank writes ``ids STEP RANK [...]`` (the sample indices of its batch at optimizer step STEP) to stdout in
one write; rank 0 prints ``step N`` after each step. With ``--sync-saves`` each checkpoint is committed before
``step N`` is printed, so a test that kills the job right after ``step N`` knows which checkpoint survives.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from syncckpt import CheckpointManager, ResumableSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from procs import end_job, say  # noqa: E402

N, BATCH, SEED = 101, 4, 3


@record  # a rank's exception goes into torchrun's failure summary (its error file), not only to its stderr
def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--hold-at", type=int, default=None, help="after step N, wait until killed (the test kills it)")
    p.add_argument("--sync-saves", action="store_true")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    say(f"pid {rank} {os.getpid()}")  # torchrun starts each rank in a session of its own: the test kills them by pid
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        stream=sys.stdout,
        format=f"[rank{rank}] %(levelname)s %(message)s",
        force=True,
    )
    x = torch.randn(N, 6, generator=torch.Generator().manual_seed(7))
    ds = TensorDataset(x, (x[:, 0] > 0).long(), torch.arange(N))
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(6, 2))
    sampler = ResumableSampler(ds, batch_size=BATCH, shuffle=True, seed=SEED)  # replicas/rank from the job
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = CheckpointManager(args.ckpt_dir, save_every_n_steps=2, keep_last=2, keep_epochs=1, grace_period=30)
    mgr.register(model=model, optimizer=opt, sampler=sampler)
    info = mgr.resume()
    start_epoch, global_step = (info.epoch, info.global_step) if info else (0, 0)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        first = info.batch_idx + 1 if info and epoch == info.epoch else 0
        for batch_idx, (xb, yb, ids) in enumerate(loader, start=first):
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            global_step += 1
            say(f"ids {global_step} {rank} {json.dumps(ids.tolist())}")
            if mgr.step(global_step, epoch=epoch, batch_idx=batch_idx) and args.sync_saves:
                mgr.wait()
            dist.barrier()  # every rank's ids line is out before rank 0 says the step is done
            if rank == 0:
                say(f"step {global_step}")
            if global_step == args.hold_at:
                threading.Event().wait()  # the killing test reads ahead of nothing: the job stops right here
        mgr.save_epoch(epoch, global_step=global_step)
    mgr.close()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        say(f"done {global_step}")
    return 0


if __name__ == "__main__":
    end_job(main())
