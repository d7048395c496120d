"""An Accelerate training script checkpointed with syncckpt: offline, on a CPU, in seconds.

A tiny classifier built locally on generated data, trained with gradient accumulation, AdamW, a warmup
scheduler and bf16 autocast (on a CPU Accelerate gives fp16 neither autocast nor a GradScaler; on a GPU pass
``--mixed-precision fp16`` and its GradScaler is checkpointed too). Every ``--every`` optimizer steps a
checkpoint is written to ``--dir`` and mirrored to ``--remote`` (default: a local folder standing in for a
bucket; any ``s3://``, ``gs://``, ``hf://`` URL works the same).

Lose the session on purpose, then run the same command again: it resumes from the newest mirrored checkpoint at
the saved batch, even with ``--dir`` deleted::

    python examples/accelerate_example.py --stop-at-step 7      # dies after step 7 (step 5 was mirrored)
    rm -rf accelerate-example/checkpoints                        # the VM is gone
    python examples/accelerate_example.py                        # pulls checkpoint-step-5, goes on at batch 10

Under several processes: ``accelerate launch --num_processes 2 examples/accelerate_example.py`` (on a CPU-only
machine add ``--multi_gpu`` so that two gloo processes start).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from syncckpt import ResumableSampler
from syncckpt.integrations.accelerate import SyncCheckpointer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="accelerate-example/checkpoints", help="local checkpoint folder")
    p.add_argument("--remote", default=None, help="mirror URL (default: the folder accelerate-example/bucket)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--every", type=int, default=5, help="save every N optimizer steps")
    p.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    p.add_argument("--stop-at-step", type=int, default=None, help="die abruptly after this optimizer step")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    remote = args.remote or Path("accelerate-example/bucket").resolve().as_uri()

    accelerator = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g)
    y = (x[:, :4].sum(1) > 0).long()
    ds = TensorDataset(x, y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    # one replica: prepare() hands each process its share of the sampler's batches
    sampler = ResumableSampler(ds, batch_size=16, shuffle=True, seed=0, num_replicas=1, rank=0)
    loader = DataLoader(ds, batch_size=16, sampler=sampler)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    ckpt = SyncCheckpointer(accelerator, args.dir, remote=remote, every_n_steps=args.every, keep_last=2)
    ckpt.register(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader)
    info = ckpt.resume()
    start_epoch, skip = (info.epoch, info.batch_idx + 1) if info else (0, 0)
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch)
        model.train()
        for i, (xb, yb) in enumerate(loader, start=skip if epoch == start_epoch else 0):
            with accelerator.accumulate(model):
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            ckpt.step(epoch=epoch, batch_idx=i)
            if accelerator.sync_gradients and ckpt.global_step == args.stop_at_step:
                ckpt.wait()  # what was saved so far is mirrored; this step's work is lost, as in a dead session
                accelerator.print(f"stopping abruptly after step {ckpt.global_step}; run again to resume")
                os._exit(1)
        accelerator.print(f"epoch {epoch}: loss {loss.item():.4f}, global step {ckpt.global_step}")
    ckpt.close()
    accelerator.print(f"done: {ckpt.global_step} optimizer steps; checkpoints in {args.dir}, mirrored to {remote}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
