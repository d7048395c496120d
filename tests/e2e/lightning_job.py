"""A tiny Lightning training job for the Lightning integration's end-to-end tests (and the native comparison).

shuffle (ResumableSampler; ``--native``: ``DataLoader(shuffle=True)``), dropout, ``accumulate_grad_batches=2``,
AdamW, a warmup/decay LambdaLR stepped every optimizer step, ``precision="bf16-mixed"`` (on CPU Lightning turns
``"16-mixed"`` into ``"bf16-mixed"``: fp16 AMP is not offered there). 96 samples, batch 8: 12 micro-batches, 6
optimizer steps per epoch; ``ModelCheckpoint(every_n_train_steps=2)``.

It prints ``step N`` after every optimizer step, ``HOLD step N`` (and then blocks) at ``--hold-at-step`` once
every checkpoint so far is mirrored, so a test can SIGKILL it at a known point without sleeping; at the end it
prints ``getitem N`` (dataset ``__getitem__`` calls of the run) and writes the model and optimizer tensors to
``--out``. ``--reference-out`` then runs an uninterrupted run from scratch in the same process (its checkpoints in a
temporary folder) and writes its tensors there, for a bit-for-bit comparison. The tests import :func:`fit` and
:func:`reference` to run a resumed session and the reference in their own process.
"""

from __future__ import annotations

import argparse
import contextlib
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
from procs import say
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


def trainer_for(directory: str, plugins: list, callbacks: list, spawn: bool = False):
    """The job's Trainer; ``spawn``: strategy ``ddp_spawn`` on 2 CPU processes (SyncCkptIO refuses it)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    return L.Trainer(
        max_epochs=EPOCHS,
        accumulate_grad_batches=ACCUM,
        precision="bf16-mixed",
        accelerator="cpu",
        devices=2 if spawn else 1,
        **({"strategy": "ddp_spawn"} if spawn else {}),
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


class Progress:
    """Prints ``step N epoch E batch B`` after every optimizer step (through ``say``), SIGTERMs its own process as
    step ``sigterm_at``'s window starts, holds at step ``hold_at`` once every checkpoint so far is mirrored."""

    def __init__(self, sync=None, sigterm_at: int | None = None, hold_at: int | None = None, say=say) -> None:
        import lightning as L

        progress = self

        class _Callback(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                progress.batch_start(trainer, batch_idx)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                progress.batch_end(trainer, batch_idx)

        self.callback = _Callback()
        self.sync, self.sigterm_at, self.hold_at, self.say = sync, sigterm_at, hold_at, say
        self.t0 = time.perf_counter()
        self.step: int | None = None

    def batch_start(self, trainer, batch_idx: int) -> None:
        if trainer.global_step == self.sigterm_at and self.step != trainer.global_step:
            self.say(f"SIGTERM at step {trainer.global_step} batch {batch_idx}")
            os.kill(os.getpid(), signal.SIGTERM)
        if self.step is None:  # the time from fit() to the first batch it trains: restore + skip
            self.say(f"first-batch {time.perf_counter() - self.t0:.3f}s")
        self.step = trainer.global_step

    def batch_end(self, trainer, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            return
        self.say(f"step {trainer.global_step} epoch {trainer.current_epoch} batch {batch_idx}")
        if trainer.global_step == self.hold_at:
            if self.sync is not None:
                self.sync.wait()  # every checkpoint so far is committed and mirrored
            self.say(f"HOLD step {trainer.global_step}")
            threading.Event().wait()


def fit(
    directory: str, sync, *, native: bool = False, ckpt_path=None, poison: bool = False, progress=None, spawn=False
):
    """One ``trainer.fit`` of the job in this process: (model, optimizer and RNG tensors, ``__getitem__`` calls)."""
    model, ds, loader = build(native)
    plugins = [] if sync is None else [sync]
    extra = [] if sync is None else [sync.callback]
    trainer = trainer_for(directory, plugins, [*extra, *([] if progress is None else [progress.callback])], spawn)
    if progress is not None:
        progress.t0 = time.perf_counter()
    with poisoned() if poison else contextlib.nullcontext():
        trainer.fit(model, loader, ckpt_path=ckpt_path)
    return tensors_of(model, trainer), ds.calls


def reference(native: bool = False):
    """The uninterrupted run from scratch (the same writes as a resumed one, never interrupted): as :func:`fit`."""
    from syncckpt.integrations.lightning import SyncCkptIO

    with tempfile.TemporaryDirectory() as d:
        return fit(d, None if native else SyncCkptIO(handle_sigterm=False), native=native)


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
    p.add_argument("--spawn", action="store_true", help="strategy='ddp_spawn' on 2 CPU processes")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s", force=True)
    torch.set_num_threads(1)

    from syncckpt.integrations.lightning import SyncCkptIO

    options = json.loads(args.storage_options) if args.storage_options else None
    sync = None if args.native else SyncCkptIO(remote=args.remote, storage_options=options, grace_period=30)
    progress = Progress(sync, args.sigterm_at_step, args.hold_at_step, say=say)
    tensors, calls = fit(
        args.dir,
        sync,
        native=args.native,
        ckpt_path=args.ckpt_path,
        poison=args.poison_pickle,
        progress=progress,
        spawn=args.spawn,
    )
    say(f"fit {time.perf_counter() - progress.t0:.2f}s")
    say(f"getitem {calls}")
    save_file(tensors, args.out)
    if args.reference_out:
        tensors, calls = reference(args.native)
        save_file(tensors, args.reference_out)
        say(f"reference getitem {calls}")
    say(f"done pid={os.getpid()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
