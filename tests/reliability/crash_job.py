"""The reliability suite's training job: the e2e tiny job (shuffle, dropout, gradient accumulation, AdamW, LambdaLR,
GradScaler, ResumableSampler) with the knobs crash trials need.

It prints ``step N`` after every optimizer step (flushed) and logs through the ``syncckpt`` logger to stdout
("Checkpoint committed: NAME (global step N)", "Mirrored NAME to URL ...", "Resuming from global step N"), so a
test can pick a kill instant from its output. ``--epochs`` defaults to a number no trial reaches: crash trials
always end in a kill.

Run it as a script (``python crash_job.py --ckpt-dir ...``) or call :func:`main` in a process forked by
``forkserver.py``; ``syncckpt`` is imported inside :func:`main`, so a forked child reads ``SYNCCKPT_FAILPOINT``
from its own environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--epochs", type=int, default=1_000_000)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--remote", default=None)
    p.add_argument("--storage-options", default=None, help="JSON object passed to the remote backend")
    p.add_argument("--remote-options", default=None, help="JSON object of backend keyword arguments")
    p.add_argument("--grace-period", type=float, default=30.0)
    p.add_argument("--no-sigterm", action="store_true", help="do not install the SIGTERM handler")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s", force=True)

    import torch
    from torch.utils.data import DataLoader

    from syncckpt import CheckpointManager, ResumableSampler

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
    from procs import say
    from tiny_train import build, train  # the e2e job's model and loop

    ds, model = build()
    accum, batch_size = 2, 8
    sampler = ResumableSampler(ds, batch_size=batch_size, shuffle=True, seed=42)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    mgr = CheckpointManager(
        args.ckpt_dir,
        save_every_n_steps=args.save_every,
        keep_last=args.keep_last,
        keep_epochs=2,
        remote=args.remote,
        storage_options=json.loads(args.storage_options) if args.storage_options else None,
        remote_options=json.loads(args.remote_options) if args.remote_options else None,
        grace_period=args.grace_period,
        handle_sigterm=not args.no_sigterm,
    )
    mgr.register(model=model, optimizer=opt, scheduler=sched, scaler=scaler, sampler=sampler)
    info = mgr.resume()
    say(f"resumed {info.global_step if info else 0} pid={os.getpid()}")
    global_step = train(mgr, info, model, opt, sched, scaler, sampler, loader, args.epochs, accum)
    mgr.close()
    say(f"done {global_step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
