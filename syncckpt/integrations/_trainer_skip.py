"""The O(1) mid-epoch skip of the transformers integration: the resumed epoch starts by index arithmetic.

With ``ignore_data_skip=True`` the Trainer skips nothing itself. The sampler from
:meth:`~syncckpt.integrations.transformers.SyncCheckpointCallback.train_sampler` (a :class:`TrainerSampler`) is
positioned by :func:`arm_sampler` after the last trained micro-batch when the resumed run begins, so no skipped
sample is drawn or read; :class:`ResumedPass` corrects what the Trainer counts while that epoch lasts.

>>> from transformers import TrainerState, TrainingArguments
>>> args = TrainingArguments("out", per_device_train_batch_size=2, gradient_accumulation_steps=2, report_to=[])
>>> s = sampler_for(range(8), args)  # 4 micro-batches of 2 per epoch: 2 optimizer steps
>>> s.set_epoch(1); epoch_1 = list(s)
>>> arm_sampler(s, args, TrainerState(global_step=3), batches=4)  # step 3: epoch 1 after its 2nd micro-batch
ResumedPass(epoch=1, steps_per_epoch=2, accumulation=2, batches=4)
>>> s.set_epoch(1); list(s) == epoch_1[4:]
True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from transformers import TrainerState, TrainingArguments

from .. import rng
from ..sampler import ResumableSampler

log = logging.getLogger("syncckpt")


def sampler_for(dataset: Any, args: TrainingArguments) -> TrainerSampler:
    """The Trainer's training sampler, resumable by index: a seeded shuffle (``args.data_seed``, else
    ``args.seed``), batches of ``args.per_device_train_batch_size``, single process."""
    seed = args.data_seed if args.data_seed is not None else args.seed
    return TrainerSampler(dataset, batch_size=args.per_device_train_batch_size, seed=seed, num_replicas=1, rank=0)


class TrainerSampler(ResumableSampler):
    """ResumableSampler that puts back, when the resumed pass begins, the RNG state the Trainer loaded from the
    checkpoint: ``iter(DataLoader)`` draws a seed from the global generator between the two, which the
    uninterrupted run did at the epoch's start (the Trainer's own skip re-loads ``rng_state.pth`` for the same
    reason). The Trainer calls ``set_epoch`` right after loading it."""

    rng_at_epoch: dict[str, Any] | None = None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.rng_at_epoch = rng.capture()

    def restore_rng(self) -> None:
        if self.rng_at_epoch is not None:
            rng.restore(self.rng_at_epoch)


@dataclass
class ResumedPass:
    """The epoch a resumed run re-enters mid-way, and what the Trainer needs corrected while it lasts."""

    epoch: int
    steps_per_epoch: int  # optimizer steps
    accumulation: int
    batches: int  # micro-batches per epoch

    def fix_epoch(self, state: TrainerState) -> ResumedPass | None:
        """The Trainer counts the resumed pass's micro-batches from 0 (it skipped nothing itself): set
        ``state.epoch`` to the uninterrupted run's value (same expression, same float). None once past it."""
        done = state.global_step - self.epoch * self.steps_per_epoch
        if not 0 < done <= self.steps_per_epoch:
            return None
        state.epoch = self.epoch + (done * self.accumulation) / self.batches
        return self


def arm_sampler(
    sampler: TrainerSampler, args: TrainingArguments, state: TrainerState, batches: int
) -> ResumedPass | None:
    """At ``on_train_begin`` with ``ignore_data_skip``: check the Trainer's loop allows the O(1) skip, and on a
    resumed run position the sampler after the last trained batch."""
    ga = args.gradient_accumulation_steps
    if args.world_size > 1:
        raise ValueError(
            "train_sampler() with ignore_data_skip=True is single-process only (accelerate shards its batches "
            "across processes); leave ignore_data_skip=False to use the Trainer's own skip"
        )
    if batches % ga:
        raise ValueError(
            f"train_sampler() with ignore_data_skip=True needs the batches per epoch ({batches}) to be a multiple "
            f"of gradient_accumulation_steps ({ga}): the Trainer would miss the optimizer step at the end of the "
            "resumed epoch; change the batch size, dataloader_drop_last or leave ignore_data_skip=False"
        )
    steps_per_epoch = max(batches // ga, 1)
    epoch, done = divmod(state.global_step, steps_per_epoch)
    if done == 0:  # a fresh run, or a checkpoint at an epoch's end: the Trainer starts the epoch from its start
        return None
    trained = done * ga
    sampler.load_state_dict({**sampler.state_dict(), "epoch": epoch, **sampler.checkpoint_position(epoch, trained - 1)})
    sampler.on_resumed_pass(sampler.restore_rng)
    log.info("Resuming epoch %d after its batch %d by index: the batches before are not read", epoch, trained)
    return ResumedPass(epoch, steps_per_epoch, ga, batches)
