"""Lightning + syncckpt, offline on a CPU in well under a minute: train, lose the session, resume from the "bucket".

Session 1 trains a tiny classifier (built here, no download) for 7 optimizer steps, checkpointing every 3 through
``SyncCkptIO``, which mirrors each checkpoint to a remote: a ``file://`` folder standing in for ``s3://...``.
Then the session's disk is wiped. Session 2 runs the same code with ``trainer.fit(ckpt_path="last")``: it pulls
the newest verified checkpoint from the remote and continues at the saved batch of the epoch.

    python examples/lightning_example.py
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from syncckpt import ResumableSampler
from syncckpt.integrations.lightning import SyncCkptIO


class TinyClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 2)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def session(work: Path, remote: str, max_steps: int) -> L.Trainer:
    """One notebook session: the same code every time."""
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(160, 16, generator=g), torch.randint(0, 2, (160,), generator=g))
    loader = DataLoader(ds, batch_size=16, sampler=ResumableSampler(ds, batch_size=16, seed=0))
    sync = SyncCkptIO(remote=remote)
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=work,
        plugins=[sync],
        callbacks=[ModelCheckpoint(dirpath=work / "checkpoints", every_n_train_steps=3), sync.callback],
    )
    trainer.fit(TinyClassifier(), loader, ckpt_path="last")
    return trainer


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="syncckpt-lightning-"))
    remote = (root / "bucket" / "runs" / "lit-1").as_uri()  # s3://my-bucket/runs/lit-1 in real life
    try:
        print("== session 1: trains 7 steps (checkpoints at 3 and 6, mirrored), then the machine is lost")
        session(root / "vm", remote, max_steps=7)
        shutil.rmtree(root / "vm")
        print("== session 2: an empty disk; fit(ckpt_path='last') pulls step 6 from the remote and goes on to 12")
        trainer = session(root / "vm", remote, max_steps=12)
        print(
            f"== done at global step {trainer.global_step}; remote holds:",
            sorted(p.name for p in (root / "bucket" / "runs" / "lit-1").iterdir()),
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
