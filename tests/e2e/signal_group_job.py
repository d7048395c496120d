"""A training job with DataLoader workers, for tests that signal its whole process group.

The README's loop on a tiny model: ResumableSampler, ``DataLoader(num_workers=N)``, a file:// remote, a checkpoint
every ``--save-every`` optimizer steps. Under torchrun (``WORLD_SIZE`` set) it is a DDP job over gloo and only
rank 0 prints steps. It prints (one write per line, to stdout):

- ``worker I pid PID`` from each DataLoader worker process as it starts;
- ``step N`` after every ``mgr.step()`` (rank 0);
- ``resumed step N epoch E batch B`` (or ``fresh start``) after ``resume()``;
- ``done N`` when ``--max-steps`` is reached and the manager is closed;
- ``stalling`` after step ``--stall-at``: from there the loop never comes back to ``step()``, in a validation that
  does not end (``--stall validation``) or a DataLoader whose workers block (``--stall loader``; each worker
  prints ``blocked`` when it does, and then fewer batches are in flight than an optimizer step needs).

The manager logs ``SIGTERM received`` when the signal reaches the main process; the ``step N`` printed last
before that line is the step at which the signal arrived.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

import torch
from procs import say  # noqa: E402
from torch.utils.data import DataLoader, Dataset

from syncckpt import CheckpointManager, ResumableSampler


class Squares(Dataset):
    """``i -> (x_i, y_i)`` computed on demand, so the workers do real fetching."""

    def __init__(self, n: int, block_file: str | None = None) -> None:
        self.block_file = block_file
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, :2].sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.block_file and os.path.exists(self.block_file):  # a stalled data source: never returns
            say("blocked")
            threading.Event().wait()
        return self.x[i], self.y[i]


def announce(worker_id: int) -> None:
    say(f"worker {worker_id} pid {os.getpid()}")


def stall(how: str, model: torch.nn.Module, block_file: str | None) -> None:
    """The loop goes where SIGTERM cannot find it at a step(): an endless validation, or blocked data."""
    if how == "loader":
        open(block_file, "w").close()  # the workers' next fetch blocks; the loop waits in next(loader)
        say("stalling")
        return
    say("stalling")
    with torch.no_grad():
        while True:  # a validation longer than half the grace period
            model(torch.randn(64, 8))
            time.sleep(0.01)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--remote", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--start-method", default=None, help="multiprocessing start method of the workers")
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument(
        "--step-sleep",
        type=float,
        default=0.005,
        help="seconds of simulated accelerator time per micro-batch (workload, not synchronisation)",
    )
    p.add_argument("--grace-period", type=float, default=20.0)
    p.add_argument("--stall-at", type=int, default=None, help="after this step the loop never reaches step() again")
    p.add_argument("--stall", choices=["validation", "loader"], default="validation")
    args = p.parse_args()
    rank = 0
    if "WORLD_SIZE" in os.environ:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        stream=sys.stdout,
        format="%(levelname)s %(message)s",
        force=True,
    )
    torch.set_num_threads(1)

    block_file = os.path.join(args.ckpt_dir + "-stall") if args.stall == "loader" else None
    # 16,384 samples: 512 steps per epoch, so the tests, which signal within the first few dozen steps, never see
    # the loader start a second set of workers at an epoch boundary (they count the workers they saw)
    ds = Squares(16_384, block_file)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    if "WORLD_SIZE" in os.environ:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sampler = ResumableSampler(ds, batch_size=8, shuffle=True, seed=42)
    loader = DataLoader(
        ds,
        batch_size=8,
        sampler=sampler,
        num_workers=args.workers,
        worker_init_fn=announce,
        multiprocessing_context=args.start_method if args.workers else None,
        # a stalled loader: one batch per worker in flight, fewer than a step needs, so no step follows the block
        prefetch_factor=1 if args.workers and args.stall == "loader" else None,
    )
    mgr = CheckpointManager(
        args.ckpt_dir,
        save_every_n_steps=args.save_every,
        keep_last=2,
        remote=args.remote,
        grace_period=args.grace_period,
    )
    mgr.register(model=model, optimizer=opt, sampler=sampler)
    info = mgr.resume()
    if rank == 0:
        say(f"resumed step {info.global_step} epoch {info.epoch} batch {info.batch_idx}" if info else "fresh start")
    global_step = info.global_step if info else 0
    loss_fn = torch.nn.CrossEntropyLoss()
    epoch = info.epoch if info else 0
    while global_step < args.max_steps:
        sampler.set_epoch(epoch)
        first = info.batch_idx + 1 if info and epoch == info.epoch else 0
        for batch_idx, (xb, yb) in enumerate(loader, start=first):
            (loss_fn(model(xb), yb) / args.accum).backward()
            time.sleep(args.step_sleep)
            if (batch_idx + 1) % args.accum == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
                global_step += 1
                mgr.step(global_step, epoch=epoch, batch_idx=batch_idx)
                if rank == 0:
                    say(f"step {global_step}")
                if global_step == args.stall_at:
                    stall(args.stall, model, block_file)
                if global_step >= args.max_steps:
                    break
        else:
            epoch += 1
    mgr.close()
    if "WORLD_SIZE" in os.environ:
        torch.distributed.destroy_process_group()
    if rank == 0:
        say(f"done {global_step} pid={os.getpid()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
