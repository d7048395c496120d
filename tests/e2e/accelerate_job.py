"""An Accelerate training job for end-to-end tests: shuffle, dropout, gradient accumulation 2 through
``accelerator.accumulate``, AdamW, a LambdaLR warmup, bf16 autocast, checkpointed by
:class:`syncckpt.integrations.accelerate.SyncCheckpointer`. Run it with ``python`` or ``accelerate launch``.

bf16, not fp16: on a CPU, Accelerate 1.x makes no GradScaler and no autocast for ``mixed_precision="fp16"`` (it
only enables native AMP for fp16 on an accelerator device), so fp16 would silently train in fp32 here.

``--pause-at N``: after optimizer step N, wait until every checkpoint is mirrored, print ``PAUSED`` and block, so
a test can SIGKILL the job at a known point after a mirrored checkpoint. Rank 0 writes the final model and
optimizer tensors to ``--out``; every rank writes ``--reads`` with the number of samples its dataset read and
where it resumed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import sys
import threading

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from procs import say
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from syncckpt import ResumableSampler
from syncckpt.integrations.accelerate import SyncCheckpointer

EPOCHS, BATCH, ACCUM = 2, 4, 2


class CountingDataset(Dataset):
    """Fixed random features; counts every ``__getitem__`` (a sample read from storage)."""

    def __init__(self, n: int = 96) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 16, generator=g)
        self.y = (self.x[:, :3].sum(1) > 0).long()
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.x[i], self.y[i]


def poisoned_pickle():
    """Make every unpickling path raise; returns the function that puts them back."""
    saved = (pickle.load, pickle.loads, pickle.Unpickler, torch.load)

    def poisoned(*a, **k):
        raise AssertionError("pickle used during resume")

    pickle.load = pickle.loads = torch.load = poisoned
    pickle.Unpickler = poisoned  # type: ignore[assignment,misc]

    def restore() -> None:
        pickle.load, pickle.loads, pickle.Unpickler, torch.load = saved

    return restore


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--reads", required=True, help="path prefix: each rank writes PREFIX-rankR.json")
    p.add_argument("--remote", default=None)
    p.add_argument("--storage-options", default=None, help="JSON object passed to the remote backend")
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--pause-at", type=int, default=None)
    p.add_argument("--poison-pickle", action="store_true", help="make any unpickling during resume() fail")
    p.add_argument("--dispatch", action="store_true", help="dispatch_batches: the main process reads every batch")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s", force=True)

    accelerator = Accelerator(
        mixed_precision="bf16",
        gradient_accumulation_steps=ACCUM,
        cpu=True,
        dataloader_config=DataLoaderConfiguration(dispatch_batches=args.dispatch),
    )
    torch.manual_seed(0)
    ds = CountingDataset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 2))
    # prepare() splits the sampler's batches across processes itself: one replica here
    sampler = ResumableSampler(ds, batch_size=BATCH, shuffle=True, seed=42, num_replicas=1, rank=0)
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    total = EPOCHS * math.ceil(len(ds) / BATCH / accelerator.num_processes) // ACCUM
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * max(0.0, 1 - s / total))
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)

    ckpt = SyncCheckpointer(
        accelerator,
        args.ckpt_dir,
        remote=args.remote,
        storage_options=json.loads(args.storage_options) if args.storage_options else None,
        every_n_steps=args.every,
        keep_last=2,
    )
    ckpt.register(model=model, optimizer=opt, scheduler=sched, dataloader=loader)
    restore = poisoned_pickle() if args.poison_pickle else None
    try:
        info = ckpt.resume()
    finally:
        if restore is not None:
            restore()
    resumed = None if info is None else {"epoch": info.epoch, "batch_idx": info.batch_idx, "step": info.global_step}
    say(f"rank {accelerator.process_index} resumed at {json.dumps(resumed)}")

    start_epoch, skip = (info.epoch, info.batch_idx + 1) if info else (0, 0)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(start_epoch, EPOCHS):
        loader.set_epoch(epoch)
        model.train()
        for batch_idx, (xb, yb) in enumerate(loader, start=skip if epoch == start_epoch else 0):
            with accelerator.accumulate(model):
                loss = loss_fn(model(xb), yb)
                accelerator.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
            ckpt.step(epoch=epoch, batch_idx=batch_idx)
            if accelerator.sync_gradients and ckpt.global_step == args.pause_at:
                ckpt.wait()
                say(f"rank {accelerator.process_index} PAUSED at step {ckpt.global_step}")
                threading.Event().wait()  # the test SIGKILLs the job here
    ckpt.close()

    with open(f"{args.reads}-rank{accelerator.process_index}.json", "w") as f:
        json.dump({"reads": ds.reads, "resumed": resumed, "num_processes": accelerator.num_processes}, f)
    if accelerator.is_main_process:
        tensors = {f"model.{k}": v.contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        for pid, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                tensors[f"opt.{pid}.{k}"] = v.reshape(-1).clone() if v.dim() == 0 else v.contiguous()
        save_file(tensors, args.out)
    say(f"rank {accelerator.process_index} done {ckpt.global_step}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
