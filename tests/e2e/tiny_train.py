"""A tiny, fully featured training job for end-to-end tests: shuffle, dropout, gradient accumulation, AdamW,
a warmup/decay LambdaLR and a GradScaler, written exactly like the README's loop.

It prints ``step N`` after every optimizer step (in one write, :func:`procs.say`), so a test can SIGKILL it at a
chosen moment, and writes its final model and optimizer tensors to ``--out`` (safetensors) for bit-for-bit comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import sys
import time

import torch
from procs import say
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from syncckpt import CheckpointManager, ResumableSampler


def build(seed: int = 0):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(96, 16, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    ds = TensorDataset(x, y)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 2))
    return ds, model


def train(mgr, info, model, opt, sched, scaler, sampler, loader, epochs: int, accum: int, step_sleep: float = 0.0):
    """The README's loop from where ``info`` (None: the start) left off; prints ``step N`` after every optimizer
    step. Returns the last global step. Shared with the reliability suite's crash job."""
    start_epoch = info.epoch if info else 0
    global_step = info.global_step if info else 0
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        model.train()
        first = info.batch_idx + 1 if info and epoch == info.epoch else 0
        last_loss = 0.0
        for batch_idx, (xb, yb) in enumerate(loader, start=first):
            loss = loss_fn(model(xb), yb) / accum
            scaler.scale(loss).backward()
            if (batch_idx + 1) % accum == 0:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                global_step += 1
                if step_sleep:
                    time.sleep(step_sleep)
                mgr.step(global_step, epoch=epoch, batch_idx=batch_idx, metrics={"train_loss": loss.item()})
                say(f"step {global_step}")
            last_loss = loss.item()
        mgr.save_epoch(epoch, global_step=global_step, metrics={"last_loss": last_loss})
    return global_step


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--remote", default=None)
    p.add_argument("--storage-options", default=None, help="JSON object passed to the remote backend")
    p.add_argument("--remote-options", default=None, help="JSON object of backend keyword arguments")
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--takeover", action="store_true")
    p.add_argument(
        "--step-sleep",
        type=float,
        default=0.0,
        help="seconds of simulated accelerator time per optimizer step (workload, not synchronisation)",
    )
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--poison-pickle", action="store_true", help="make any unpickling during resume() fail")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s", force=True)

    ds, model = build()
    accum, batch_size = 2, 8
    sampler = ResumableSampler(ds, batch_size=batch_size, shuffle=True, seed=42)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=args.num_workers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    total = args.epochs * len(ds) // batch_size // accum
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * max(0.0, 1 - s / total))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    storage_options = json.loads(args.storage_options) if args.storage_options else None
    mgr = CheckpointManager(
        args.ckpt_dir,
        save_every_n_steps=args.save_every,
        keep_last=args.keep_last,
        keep_epochs=2,
        remote=args.remote,
        storage_options=storage_options,
        grace_period=30,
        takeover=args.takeover,
        remote_options=json.loads(args.remote_options) if args.remote_options else None,
    )
    mgr.register(model=model, optimizer=opt, scheduler=sched, scaler=scaler, sampler=sampler)
    info = None
    if not args.no_resume:
        if args.poison_pickle:
            import builtins

            def poisoned(*a, **k):
                raise AssertionError("pickle used during resume")

            saved = (pickle.load, pickle.loads, torch.load, pickle.Unpickler)
            pickle.load = pickle.loads = torch.load = poisoned
            pickle.Unpickler = poisoned  # type: ignore[assignment,misc]
            try:
                info = mgr.resume()
            finally:
                pickle.load, pickle.loads, torch.load, pickle.Unpickler = saved
            del builtins
        else:
            info = mgr.resume()
    global_step = train(mgr, info, model, opt, sched, scaler, sampler, loader, args.epochs, accum, args.step_sleep)
    mgr.close()
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{pid}.{k}"] = v.reshape(-1).clone() if v.dim() == 0 else v.contiguous()
    tensors["scaler.scale"] = torch.tensor([scaler.get_scale()])
    tensors["rng"] = torch.get_rng_state()
    save_file(tensors, args.out)
    say(f"done {global_step} pid={os.getpid()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
