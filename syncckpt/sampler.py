"""ResumableSampler: the uninterrupted run's sample order, resumable mid-epoch in O(1).

It behaves like ``RandomSampler``/``DistributedSampler`` (a permutation seeded by ``seed + epoch``, padded and
strided across replicas), and after :class:`syncckpt.CheckpointManager` restores it, the epoch being resumed
starts right after the last trained batch: the skipped indices are sliced off, no sample is loaded.

>>> s = ResumableSampler(range(10), batch_size=2, shuffle=True, seed=0)
>>> s.set_epoch(0); full = list(s)
>>> s.load_state_dict({**s.state_dict(), "position": {"epoch": 0, "batch_idx": 1}})
>>> s.set_epoch(0); len(s), list(s) == full[4:]
(6, True)
>>> s.set_epoch(0); list(s) == full   # the skip applies to the resumed pass only
True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

log = logging.getLogger("syncckpt")


class ResumableSampler(Sampler[int]):
    """Shuffling (or sequential) sampler that resumes mid-epoch exactly.

    Args:
        data_source: the dataset (only its length is used).
        batch_size: the DataLoader's batch size (per replica); used to turn a batch index into a sample offset.
        shuffle: permute each epoch with ``torch.Generator().manual_seed(seed + epoch)``.
        seed: base seed; the same seed gives the same order in every session.
        drop_last: as in DistributedSampler: drop the tail instead of padding so replicas get equal shares.
        num_replicas, rank: data-parallel split; default from ``torch.distributed`` when it is initialised.
    """

    def __init__(
        self,
        data_source: Sized,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas is None or rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if ready else 1)
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.data_source = data_source
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._resume_epoch: int | None = None
        self._resume_skip = 0
        self._on_resume_iter: Callable[[], None] | None = None

    # -- sizes -------------------------------------------------------------------------------------------------
    def _per_replica(self) -> int:
        n = len(self.data_source)
        if self.drop_last and n % self.num_replicas:
            return n // self.num_replicas
        return math.ceil(n / self.num_replicas)

    def _skip(self) -> int:
        return self._resume_skip if self._resume_epoch == self.epoch else 0

    def __len__(self) -> int:
        """Samples the next iteration yields (fewer than a full epoch on the pass being resumed)."""
        return max(self._per_replica() - self._skip(), 0)

    # -- order -------------------------------------------------------------------------------------------------
    def _indices(self) -> list[int]:
        n = len(self.data_source)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        total = self._per_replica() * self.num_replicas
        if total > len(indices):  # pad by repeating, as DistributedSampler does
            reps = math.ceil((total - len(indices)) / max(len(indices), 1))
            indices += (indices * reps)[: total - len(indices)]
        return indices[:total][self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        skip = self._skip()
        if self._resume_epoch == self.epoch:
            self._resume_epoch = None  # one resumed pass; later passes of any epoch start at 0
            hook, self._on_resume_iter = self._on_resume_iter, None
            if hook is not None:
                hook()
        indices = self._indices()
        return iter(indices[skip:])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (call it before every epoch)."""
        self.epoch = int(epoch)

    # -- checkpoint protocol -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Settings that define the order. The saved state also holds ``position`` (epoch, batch_idx): see
        :meth:`checkpoint_position`."""
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "batch_size": self.batch_size,
            "num_samples": len(self.data_source),
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the order's settings and arm the skip for the epoch being resumed."""
        n = state.get("num_samples")
        if n is not None and n != len(self.data_source):
            log.warning(
                "ResumableSampler: the checkpoint was taken over %d samples, the dataset now has %d; "
                "the resumed order is not the original one",
                n,
                len(self.data_source),
            )
        for key in ("seed", "shuffle", "drop_last"):
            if key in state:
                setattr(self, key, state[key])
        if state.get("batch_size", self.batch_size) != self.batch_size:
            log.warning(
                "ResumableSampler: batch_size changed from %s to %s; the skip uses the saved one",
                state["batch_size"],
                self.batch_size,
            )
        self.epoch = int(state.get("epoch", self.epoch))
        pos = state.get("position")
        if pos and pos.get("batch_idx", -1) >= 0:
            self._resume_epoch = int(pos["epoch"])
            self._resume_skip = (int(pos["batch_idx"]) + 1) * int(state.get("batch_size", self.batch_size))
        else:
            self._resume_epoch, self._resume_skip = None, 0

    # -- resume hooks (syncckpt.restore) ------------------------------------------------------------------------
    def checkpoint_position(self, epoch: int, batch_idx: int) -> dict[str, Any]:
        """Saved with the state: the loop position, so a resumed pass skips what was trained."""
        return {"position": {"epoch": epoch, "batch_idx": batch_idx}}

    def on_resumed_pass(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` when the pass being resumed begins (after the DataLoader drew its worker seed)."""
        self._on_resume_iter = hook
