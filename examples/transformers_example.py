"""transformers Trainer + syncckpt, offline on a CPU in well under a minute: train, lose the session, resume.

Session 1 trains a tiny BERT (built from a config, no download) on a synthetic task for 14 optimizer steps,
checkpointing every 5 steps and at the end. ``PicklefreeTrainer`` writes no pickle in any checkpoint file;
``SyncCheckpointCallback`` mirrors each ``checkpoint-N`` to a remote, here a ``file://`` folder standing in for
``s3://...``. Then the session's disk is wiped. Session 2 runs the same code: ``resume_checkpoint`` pulls the
newest verified checkpoint from the remote, and the Trainer continues at the saved step, mid-epoch, with the O(1)
skip of the callback's sampler (no skipped sample is read).

    python examples/transformers_example.py
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from syncckpt.integrations.transformers import PicklefreeTrainer, SyncCheckpointCallback, resume_checkpoint


class TokenSum(torch.utils.data.Dataset):
    """Random token ids; the label says whether their sum is above the middle. Counts the samples it serves."""

    def __init__(self, n: int = 128) -> None:
        self.ids = torch.randint(1, 48, (n, 8), generator=torch.Generator().manual_seed(0))
        self.labels = (self.ids.sum(1) > 8 * 24).long()
        self.reads = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.reads += 1
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def session(work: Path, remote: str, max_steps: int) -> tuple[PicklefreeTrainer, TokenSum]:
    """One notebook session: the same code every time."""
    sync = SyncCheckpointCallback(remote)

    class Trainer(PicklefreeTrainer):  # the callback's sampler: the resumed epoch starts at the saved batch
        def _get_train_sampler(self, train_dataset=None):
            return sync.train_sampler(self.train_dataset if train_dataset is None else train_dataset, self.args)

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=48,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=8,
    )
    args = TrainingArguments(
        str(work / "out"),
        max_steps=max_steps,
        save_steps=5,
        save_total_limit=2,
        per_device_train_batch_size=16,
        ignore_data_skip=True,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        logging_steps=100,
    )
    data = TokenSum()
    trainer = Trainer(model=BertForSequenceClassification(config), args=args, train_dataset=data, callbacks=[sync])
    trainer.train(resume_from_checkpoint=resume_checkpoint(remote, args.output_dir))
    return trainer, data


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("syncckpt").setLevel(logging.INFO)
    root = Path(tempfile.mkdtemp(prefix="syncckpt-trainer-"))
    remote = (root / "bucket" / "runs" / "bert-1").as_uri()  # s3://my-bucket/runs/bert-1 in real life
    try:
        print("== session 1: trains 14 steps (checkpoints at 5, 10 and 14, mirrored), then the machine is lost")
        session(root / "vm", remote, max_steps=14)
        shutil.rmtree(root / "vm")
        print(
            "== session 2: an empty disk; resume_checkpoint pulls checkpoint-14, mid-epoch, and training goes on to 20"
        )
        trainer, data = session(root / "vm", remote, max_steps=20)
        print(
            f"== done at global step {trainer.state.global_step}; "
            f"session 2 read {data.reads} samples for its 6 steps of 16 (the loader reads one batch ahead)"
        )
        print("== remote holds:", sorted(p.name for p in (root / "bucket" / "runs" / "bert-1").iterdir()))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
