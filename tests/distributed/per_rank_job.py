"""A torchrun job (gloo, CPU) whose ranks stream different data: a Hugging Face IterableDataset split with
``split_dataset_by_node``, shuffled by a :class:`syncckpt.ShuffleBuffer`, in a ``StatefulDataLoader``. Each rank's
loader state is its own (its shards, its buffer), so every rank must get its own state back on resume.

Protocol as ``elastic_job.py``: ``pid RANK PID`` at start, ``ids STEP RANK [...]`` per step, ``step N`` from rank 0
once every rank's checkpoint of step N is committed, and ``--hold-at N`` waits there to be killed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
from datasets.distributed import split_dataset_by_node
from torch.distributed.elastic.multiprocessing.errors import record
from torchdata.stateful_dataloader import StatefulDataLoader

from syncckpt import CheckpointManager, ShuffleBuffer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from procs import end_job, say  # noqa: E402

SHARDS, ROWS, BUFFER, BATCH = 4, 8, 3, 2  # 32 samples; shard s holds s*ROWS .. s*ROWS+ROWS-1


def rows(shards: list[int]):
    for s in shards:
        for i in range(s * ROWS, (s + 1) * ROWS):
            yield {"i": i}


def rank_loader(rank: int, world_size: int) -> StatefulDataLoader:
    """This rank's loader; the test builds the same one in its own process for the uninterrupted order."""
    ds = datasets.IterableDataset.from_generator(rows, gen_kwargs={"shards": list(range(SHARDS))})
    return StatefulDataLoader(ShuffleBuffer(split_dataset_by_node(ds, rank, world_size), BUFFER, seed=5), BATCH)


@record
def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--hold-at", type=int, default=None)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    say(f"pid {rank} {os.getpid()}")
    loader = rank_loader(rank, world)
    mgr = CheckpointManager(args.ckpt_dir, save_every_n_steps=1, keep_last=2, handle_sigterm=False)
    mgr.register(model=torch.nn.Linear(1, 1), loader=loader)
    try:
        info = mgr.resume()
    except Exception as e:  # noqa: BLE001 - the test reads the one line
        say(f"resume failed: {type(e).__name__}: {e}")
        return 2
    step = info.global_step if info else 0
    first = info.batch_idx + 1 if info else 0
    for batch_idx, batch in enumerate(loader, start=first):
        step += 1
        say(f"ids {step} {rank} {json.dumps(batch['i'].tolist())}")
        mgr.step(step, epoch=0, batch_idx=batch_idx)
        mgr.wait()  # committed before rank 0 says the step is done
        dist.barrier()
        if rank == 0:
            say(f"step {step}")
        if step == args.hold_at:
            threading.Event().wait()
    mgr.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    end_job(main())
