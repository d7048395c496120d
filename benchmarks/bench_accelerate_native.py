"""Accelerate's own resume (``save_state``/``load_state`` + ``skip_first_batches``) against syncckpt's
:class:`~syncckpt.integrations.accelerate.SyncCheckpointer`, in the setting of ``tests/e2e/accelerate_job.py``.

1. **Exactness**: shuffle, dropout, gradient accumulation 2 (``accelerator.accumulate``), AdamW, a LambdaLR
   warmup, bf16 autocast (on a CPU Accelerate gives fp16 neither autocast nor a GradScaler). A run saves at
   optimizer step 5 (mid-epoch 0), trains on to step 6 and is abandoned; a fresh set of objects (after the
   global RNG was reseeded, as a new process would be) resumes from the step-5 checkpoint and trains to the end.
   Are the final model and AdamW tensors bit-identical to an uninterrupted run? Native resume is tried with
   the loader a script has by default (``shuffle=True``: a ``RandomSampler``), with
   ``DataLoaderConfiguration(use_seedable_sampler=True)``, and with the same ``ResumableSampler`` syncckpt uses.
   Every native variant calls ``skip_first_batches(loader, batch_idx + 1)`` for the resumed epoch.
2. **Skip cost**: a map-style dataset of ``--samples`` samples that counts ``__getitem__``, batch size 8,
   resumed in the middle of the epoch: the time from "resume done" to the first batch of the resumed pass, and
   how many samples were read to get there (a DataLoaderShard reads two batches before it yields the first).
   The baseline row is an epoch's first batch with nothing skipped: drawing the epoch's permutation, which
   every method pays.

Usage:  python benchmarks/bench_accelerate_native.py [--samples 400000] [--repeat 3]
Writes benchmarks/results/accelerate_native.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader, Dataset

from syncckpt import ResumableSampler
from syncckpt.integrations.accelerate import SyncCheckpointer

RESULTS = Path(__file__).with_name("results")
EPOCHS, BATCH, ACCUM, SAVE_AT, LOST_AT = 2, 4, 2, 5, 6


class Counting(Dataset):
    """Fixed random features (the e2e job's data); counts every ``__getitem__``."""

    def __init__(self, n: int = 96, dim: int = 16) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        self.y = (self.x[:, :3].sum(1) > 0).long()
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.x[i], self.y[i]


def _fresh_accelerator(seedable: bool = False) -> Accelerator:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    config = DataLoaderConfiguration(use_seedable_sampler=seedable)
    return Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=ACCUM, dataloader_config=config)


def _build(variant: str):
    accelerator = _fresh_accelerator(seedable=variant == "native, seedable sampler")
    torch.manual_seed(0)
    ds = Counting()
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 2))
    if variant in ("syncckpt", "native, ResumableSampler"):
        sampler = ResumableSampler(ds, batch_size=BATCH, shuffle=True, seed=42, num_replicas=1, rank=0)
        loader = DataLoader(ds, batch_size=BATCH, sampler=sampler)
    else:
        loader = DataLoader(ds, batch_size=BATCH, shuffle=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    total = EPOCHS * math.ceil(len(ds) / BATCH) // ACCUM
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * max(0.0, 1 - s / total))
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    return accelerator, model, opt, sched, loader


def _train(accelerator, model, opt, sched, loader, start, on_step, first_loader=None) -> None:
    """Train from ``start`` = (epoch, first batch index, global step); ``on_step(epoch, batch_idx, step)`` after
    each optimizer step returns True to stop."""
    start_epoch, skip, step = start
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(start_epoch, EPOCHS):
        resumed = epoch == start_epoch and first_loader is not None
        it = first_loader if resumed else loader
        it.set_epoch(epoch)
        for i, (xb, yb) in enumerate(it, start=skip if epoch == start_epoch else 0):
            with accelerator.accumulate(model):
                accelerator.backward(loss_fn(model(xb), yb))
                opt.step()
                sched.step()
                opt.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                if on_step(epoch, i, step):
                    return


def _tensors(accelerator, model, opt) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        out.update({f"opt.{pid}.{k}": v.clone() for k, v in st.items()})
    return out


def _reference(variant: str) -> dict[str, torch.Tensor]:
    accelerator, model, opt, sched, loader = _build(variant)
    _train(accelerator, model, opt, sched, loader, (0, 0, 0), lambda e, i, s: False)
    return _tensors(accelerator, model, opt)


def _interrupted(variant: str, folder: Path) -> dict[str, torch.Tensor]:
    saved: dict[str, int] = {}
    accelerator, model, opt, sched, loader = _build(variant)
    if variant == "syncckpt":
        ckpt = SyncCheckpointer(accelerator, folder, every_n_steps=SAVE_AT, handle_sigterm=False)
        ckpt.register(model=model, optimizer=opt, scheduler=sched, dataloader=loader)

        def on_step(epoch: int, i: int, step: int) -> bool:
            ckpt.step(epoch=epoch, batch_idx=i)  # counts this optimizer step as the loop did
            return ckpt.global_step == LOST_AT

        _train(accelerator, model, opt, sched, loader, (0, 0, 0), on_step)
        ckpt.close()
        torch.manual_seed(999)  # a new process: another global RNG state
        accelerator, model, opt, sched, loader = _build(variant)
        ckpt = SyncCheckpointer(accelerator, folder, handle_sigterm=False)
        ckpt.register(model=model, optimizer=opt, scheduler=sched, dataloader=loader)
        info = ckpt.resume()
        _train(accelerator, model, opt, sched, loader, (info.epoch, info.batch_idx + 1, info.global_step), _never)
        ckpt.close()
        return _tensors(accelerator, model, opt)

    def on_step_native(epoch: int, i: int, step: int) -> bool:
        if step == SAVE_AT:
            accelerator.save_state(str(folder))
            saved.update(epoch=epoch, batch_idx=i, step=step)
        return step == LOST_AT

    _train(accelerator, model, opt, sched, loader, (0, 0, 0), on_step_native)
    torch.manual_seed(999)
    accelerator, model, opt, sched, loader = _build(variant)
    accelerator.load_state(str(folder))
    skipped = accelerator.skip_first_batches(loader, saved["batch_idx"] + 1)
    start = (saved["epoch"], saved["batch_idx"] + 1, saved["step"])
    _train(accelerator, model, opt, sched, loader, start, _never, first_loader=skipped)
    return _tensors(accelerator, model, opt)


def _never(epoch: int, i: int, step: int) -> bool:
    return False


def exactness(variant: str) -> dict[str, object]:
    ref = _reference(variant)
    with tempfile.TemporaryDirectory() as d:
        got = _interrupted(variant, Path(d) / "ckpt")
    diff = [k for k in ref if not torch.equal(ref[k], got[k])]
    return {"variant": variant, "bit_identical": not diff, "tensors_differing": len(diff), "tensors": len(ref)}


def skip_cost(samples: int, batch: int = 8) -> list[dict[str, object]]:
    skip_batches = samples // batch // 2
    rows = []
    # native: skip_first_batches over the prepared loader
    accelerator = _fresh_accelerator()
    ds = Counting(samples, dim=2)
    loader = accelerator.prepare(DataLoader(ds, batch_size=batch, shuffle=True))
    t0 = time.perf_counter()
    next(iter(loader))  # the baseline: an epoch's first batch (drawing the permutation), nothing skipped
    rows.append({"method": "no skip (an epoch's first batch)", "seconds": time.perf_counter() - t0, "reads": ds.reads})
    ds.reads = 0
    t0 = time.perf_counter()
    next(iter(accelerator.skip_first_batches(loader, skip_batches)))
    rows.append({"method": "native skip_first_batches", "seconds": time.perf_counter() - t0, "reads": ds.reads})
    # syncckpt: the ResumableSampler position restored by resume()
    with tempfile.TemporaryDirectory() as d:
        for phase in ("save", "resume"):
            accelerator = _fresh_accelerator()
            ds = Counting(samples, dim=2)
            sampler = ResumableSampler(ds, batch_size=batch, shuffle=True, seed=0, num_replicas=1, rank=0)
            loader = accelerator.prepare(DataLoader(ds, batch_size=batch, sampler=sampler))
            ckpt = SyncCheckpointer(accelerator, d, handle_sigterm=False)
            ckpt.register(dataloader=loader)
            if phase == "save":
                ckpt.manager.save(skip_batches, epoch=0, batch_idx=skip_batches - 1)
            else:
                t_resume = time.perf_counter()
                ckpt.resume()
                t0 = time.perf_counter()
                next(iter(loader))
                t1 = time.perf_counter()
                rows.append(
                    {
                        "method": "syncckpt ResumableSampler",
                        "seconds": t1 - t0,
                        "reads": ds.reads,
                        "resume_s": t0 - t_resume,
                    }
                )
            ckpt.close()
    for r in rows:
        r["skipped_batches"] = skip_batches
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=400_000, help="dataset size of the skip-cost measurement")
    p.add_argument("--repeat", type=int, default=3, help="skip-cost runs; the table shows medians")
    args = p.parse_args()
    logging.getLogger("syncckpt").setLevel(logging.WARNING)
    variants = ["syncckpt", "native, shuffle=True", "native, seedable sampler", "native, ResumableSampler"]
    exact = [exactness(v) for v in variants]
    runs = [skip_cost(args.samples) for _ in range(args.repeat)]  # methods alternate within each run
    skips = [
        {**rows[0], "seconds": statistics.median(r["seconds"] for r in rows), "samples_s": [r["seconds"] for r in rows]}
        for rows in zip(*runs, strict=True)
    ]
    print(f"{'resume after a kill at step 6 (saved at step 5)':<52} {'bit-identical':>14} {'tensors differing':>18}")
    for r in exact:
        print(f"{r['variant']:<52} {str(r['bit_identical']):>14} {r['tensors_differing']:>12} of {r['tensors']}")
    print()
    head = f"skip {skips[0]['skipped_batches']} batches of {args.samples} samples"
    print(f"{head:<46} {'to first batch (median)':>25} {'reads':>8}")
    for r in skips:
        print(f"{r['method']:<46} {r['seconds'] * 1000:>22.1f} ms {r['reads']:>8}")
    print(f"(syncckpt's resume() itself, reading and verifying its checkpoint: {skips[-1]['resume_s'] * 1000:.1f} ms)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "accelerate_native.json").write_text(json.dumps({"exactness": exact, "skip": skips}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
