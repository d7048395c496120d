"""A tiny ``transformers.Trainer`` job mirrored by ``SyncCheckpointCallback``, for end-to-end kill/resume tests.

A 2-layer BERT built from ``BertConfig`` (hidden size 32, no download) learns a synthetic token-sum task. Every
logged step prints ``LOG step N``; with ``--hold-at-step K`` the job waits at step K until every checkpoint saved so
far is mirrored, prints ``HOLD step K`` and blocks until it is killed, so a test can SIGKILL it at a known point.
With ``--hold-until-sigterm`` it instead blocks at step K only until the callback has seen the SIGTERM the test
sends (then training goes on, and the callback saves at the next step). ``--o1-skip`` trains with the callback's
``train_sampler`` and ``ignore_data_skip=True``. ``build_trainer`` is imported by the tests to run the resumed
session in-process.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import threading
import time
from typing import Any

import torch
from procs import say
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from syncckpt.integrations.transformers import PicklefreeCheckpoints, PicklefreeTrainer, SyncCheckpointCallback

VOCAB, SEQ_LEN = 48, 8


class TokenSumDataset(torch.utils.data.Dataset):
    """Random token ids; the label says whether their sum is above the median."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=g)
        sums = self.ids.sum(1)
        self.labels = (sums > sums.median()).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
            "labels": self.labels[i],
        }


class CountingDataset(TokenSumDataset):
    """Records every index read, to show which samples a resumed run loads."""

    def __init__(self, n: int, seed: int) -> None:
        super().__init__(n, seed)
        self.reads: list[int] = []

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.reads.append(int(i))
        return super().__getitem__(i)


class SamplerTrainer(Trainer):
    """The documented way to train with the callback's O(1)-resumable sampler."""

    def __init__(self, *args: Any, sync: SyncCheckpointCallback, **kwargs: Any) -> None:
        self.sync = sync
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        return self.sync.train_sampler(self.train_dataset if train_dataset is None else train_dataset, self.args)


class PicklefreeSamplerTrainer(PicklefreeCheckpoints, SamplerTrainer):
    """Both: the O(1)-resumable sampler and checkpoints without pickle."""


class StepLog(TrainerCallback):
    """Records (and prints) the global step of every log entry; optionally holds the job at one step."""

    def __init__(
        self, hold_at: int | None = None, sync: SyncCheckpointCallback | None = None, until_sigterm: bool = False
    ) -> None:
        self.steps: list[int] = []
        self.hold_at = hold_at
        self.sync = sync
        self.until_sigterm = until_sigterm

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.steps.append(state.global_step)
            say(f"LOG step {state.global_step}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.hold_at is not None and state.global_step == self.hold_at and self.until_sigterm:
            say(f"HOLD step {state.global_step}")
            deadline = time.monotonic() + 60
            while not self.sync.terminating:  # the handler runs between bytecodes: poll the flag
                assert time.monotonic() < deadline, "no SIGTERM within 60 s"
                threading.Event().wait(0.01)
            say(f"SIGTERM seen at step {state.global_step}")
        elif self.hold_at is not None and state.global_step == self.hold_at:
            assert self.sync is not None and self.sync.wait(60), "checkpoints were not mirrored within 60 s"
            say(f"HOLD step {state.global_step}")
            threading.Event().wait()  # until the test kills this process


def tiny_model(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ_LEN,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def build_trainer(
    output_dir: str,
    callbacks: list[TrainerCallback],
    max_steps: int = 10,
    save_steps: int = 2,
    save_total_limit: int | None = 2,
    eval_steps: int | None = None,
    compute_metrics: Any = None,
    train_dataset: torch.utils.data.Dataset | None = None,
    sampler_of: SyncCheckpointCallback | None = None,
    batch_size: int = 8,
    picklefree: bool = False,
    **extra_args: Any,
) -> Trainer:
    """The same Trainer in every session: only ``output_dir`` and the callbacks differ. ``sampler_of``: train
    with that callback's ``train_sampler`` and ``ignore_data_skip=True`` (the O(1) mid-epoch skip);
    ``picklefree``: with syncckpt's ``PicklefreeCheckpoints`` mixed in."""
    if sampler_of is not None:
        extra_args["ignore_data_skip"] = True
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        logging_strategy="steps",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=extra_args.pop("dataloader_num_workers", 0),
        seed=7,
        data_seed=7,
        disable_tqdm=True,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        per_device_eval_batch_size=16,
        **extra_args,
    )
    if sampler_of is None:
        trainer_cls: Any = PicklefreeTrainer if picklefree else Trainer
    else:
        sampling = PicklefreeSamplerTrainer if picklefree else SamplerTrainer
        trainer_cls = functools.partial(sampling, sync=sampler_of)
    return trainer_cls(
        model=tiny_model(),
        args=args,
        train_dataset=TokenSumDataset(64, seed=1) if train_dataset is None else train_dataset,
        eval_dataset=TokenSumDataset(16, seed=2) if eval_steps else None,
        callbacks=callbacks,
        compute_metrics=compute_metrics,
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--output-dir", required=True)
    p.add_argument("--remote", required=True)
    p.add_argument("--storage-options", default=None, help="JSON object passed as storage_options")
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--hold-at-step", type=int, default=None)
    p.add_argument("--hold-until-sigterm", action="store_true")
    p.add_argument("--o1-skip", action="store_true", help="the callback's train_sampler with ignore_data_skip")
    p.add_argument("--trainer-args", default="{}", help="JSON object of extra build_trainer keyword arguments")
    p.add_argument("--grace-period", type=float, default=60.0)
    args = p.parse_args()
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s", force=True
    )
    logging.getLogger("syncckpt").setLevel(logging.INFO)
    torch.set_num_threads(1)  # as the tests' in-process runs: the same sums in the same order, and faster here
    options = json.loads(args.storage_options) if args.storage_options else None
    sync = SyncCheckpointCallback(args.remote, storage_options=options, grace_period=args.grace_period)
    steps = StepLog(args.hold_at_step, sync, until_sigterm=args.hold_until_sigterm)
    trainer = build_trainer(
        args.output_dir,
        [sync, steps],
        max_steps=args.max_steps,
        sampler_of=sync if args.o1_skip else None,
        **json.loads(args.trainer_args),
    )
    trainer.train()
    say(f"done {trainer.state.global_step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
