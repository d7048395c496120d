"""A tiny Lightning training job for the Lightning integration's end-to-end tests (and the native comparison).

shuffle (ResumableSampler; ``--native``: ``DataLoader(shuffle=True)``), dropout, ``accumulate_grad_batches=2``,
AdamW, a warmup/decay LambdaLR stepped every optimizer step, ``precision="bf16-mixed"`` (on CPU Lightning turns
``"16-mixed"`` into ``"bf16-mixed"``: fp16 AMP is not offered there). 96 samples, batch 8: 12 micro-batches, 6
optimizer steps per epoch; ``ModelCheckpoint(every_n_train_steps=2)``.

It prints ``step N`` after every optimizer step, ``HOLD step N`` (and then blocks) at ``--hold-at-step`` once
every checkpoint so far is mirrored, so a test can SIGKILL it at a known point without sleeping; at the end it
prints ``getitem N`` (dataset ``__getitem__`` calls of the run) and writes the model and optimizer tensors to
``--out``. ``--reference-out`` then runs an uninterrupted run from scratch in the same process (no checkpoints)
and writes its tensors there, for a bit-for-bit comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import signal
import sys
import tempfile
import threading
import time

import torch
from safetensors.torch import save_file

SAMPLES, BATCH, ACCUM, EPOCHS = 96, 8, 2, 3


class CountingDataset(torch.utils.data.Dataset):
    """A fixed random classification set that counts ``__getitem__`` calls (the skip-cost measure)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(SAMPLES, 16, generator=g)
        self.y = (self.x[:, :3].sum(1) > 0).long()
        self.calls = 0

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int):
        self.calls += 1
        return self.x[i], self.y[i]


def build(native: bool):
    import lightning as L

    from syncckpt import ResumableSampler

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 2)
            )

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
            total = EPOCHS * SAMPLES // BATCH // ACCUM
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * max(0.0, 1 - s / total))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    L.seed_everything(0, verbose=False)
    ds = CountingDataset()
    if native:
        loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True)
    else:
        loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, sampler=ResumableSampler(ds, BATCH, seed=42))
    return Tiny(), ds, loader


def trainer_for(directory: str, plugins: list, callbacks: list):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    return L.Trainer(
        max_epochs=EPOCHS,
        accumulate_grad_batches=ACCUM,
        precision="bf16-mixed",
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=directory,
        plugins=plugins,
        callbacks=[ModelCheckpoint(dirpath=directory, every_n_train_steps=2), *callbacks],
    )


def tensors_of(model, trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for pid, st in trainer.optimizers[0].state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{pid}.{k}"] = v.reshape(-1).clone() if v.dim() == 0 else v.contiguous()
    out["rng"] = torch.get_rng_state()
    return out


def poisoned():
    """pickle.load/loads/Unpickler and torch.load raise while the returned context is active."""
    import contextlib

    def refuse(*a, **k):
        raise AssertionError("pickle or torch.load used during a syncckpt resume")

    @contextlib.contextmanager
    def ctx():
        saved = (pickle.load, pickle.loads, pickle.Unpickler, torch.load)
        pickle.load = pickle.loads = torch.load = refuse
        pickle.Unpickler = refuse  # type: ignore[assignment,misc]
        try:
            yield
        finally:
            pickle.load, pickle.loads, pickle.Unpickler, torch.load = saved

    return ctx()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--remote", default=None)
    p.add_argument("--storage-options", default=None, help="JSON object passed to the remote backend")
    p.add_argument("--ckpt-path", default=None, help="trainer.fit(ckpt_path=...): 'last', a URL or a path")
    p.add_argument("--hold-at-step", type=int, default=None)
    p.add_argument("--sigterm-at-step", type=int, default=None, help="SIGTERM itself as step N+1's window starts")
    p.add_argument("--poison-pickle", action="store_true")
    p.add_argument("--native", action="store_true", help="Lightning's own TorchCheckpointIO and a shuffling loader")
    p.add_argument("--reference-out", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s", force=True)
    torch.set_num_threads(1)
    import lightning as L

    from syncckpt.integrations.lightning import SyncCkptIO

    class Progress(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == args.sigterm_at_step and getattr(self, "step", None) != trainer.global_step:
                print(f"SIGTERM at step {trainer.global_step} batch {batch_idx}", flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
            if not hasattr(self, "step"):  # the time from fit() to the first batch it trains: restore + skip
                print(f"first-batch {time.perf_counter() - t0:.3f}s", flush=True)
            self.step = trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == self.step:
                return
            print(f"step {trainer.global_step} epoch {trainer.current_epoch} batch {batch_idx}", flush=True)
            if trainer.global_step == args.hold_at_step:
                if sync is not None:
                    sync.wait()  # every checkpoint so far is committed and mirrored
                print(f"HOLD step {trainer.global_step}", flush=True)
                threading.Event().wait()

    options = json.loads(args.storage_options) if args.storage_options else None
    sync = None if args.native else SyncCkptIO(remote=args.remote, storage_options=options, grace_period=30)
    model, ds, loader = build(args.native)
    plugins = [] if sync is None else [sync]
    extra = [] if sync is None else [sync.callback]
    trainer = trainer_for(args.dir, plugins, [*extra, Progress()])
    t0 = time.perf_counter()
    if args.poison_pickle:
        with poisoned():
            trainer.fit(model, loader, ckpt_path=args.ckpt_path)
    else:
        trainer.fit(model, loader, ckpt_path=args.ckpt_path)
    print(f"fit {time.perf_counter() - t0:.2f}s", flush=True)
    print(f"getitem {ds.calls}", flush=True)
    save_file(tensors_of(model, trainer), args.out)
    if args.reference_out:
        model, ds, loader = build(args.native)
        with tempfile.TemporaryDirectory() as d:
            ref = None if args.native else SyncCkptIO(handle_sigterm=False)  # the same writes, never interrupted
            trainer = trainer_for(d, [] if ref is None else [ref], [] if ref is None else [ref.callback])
            trainer.fit(model, loader)
        save_file(tensors_of(model, trainer), args.reference_out)
        print(f"reference getitem {ds.calls}", flush=True)
    print(f"done pid={os.getpid()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
