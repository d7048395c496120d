"""ResumableSampler: the uninterrupted run's sample order, resumable mid-epoch in O(1), elastic across world sizes.

It behaves like ``RandomSampler``/``DistributedSampler`` (a permutation seeded by ``seed + epoch``, padded and
strided across replicas), and after :class:`syncckpt.CheckpointManager` restores it, the epoch being resumed
starts right after the last trained batch: the skipped indices are sliced off, no sample is loaded.

The saved position is in **global samples consumed** (``samples_consumed``: every replica's batches together), not
in per-replica batches, so the epoch being resumed may continue with another ``num_replicas`` or ``batch_size``.
The rule: the epoch's global order is the permutation of all ``n`` samples; a checkpoint after ``C`` global samples
has trained its first ``C`` (with R replicas, replica r had positions r, r + R, ...). The resumed pass takes the
rest, ``order[C:n]``, and splits it over the new replicas as DistributedSampler splits a whole epoch: padded to a
multiple of the new ``num_replicas`` by repeating the epoch's first samples (``drop_last``: truncated to one), then
strided (rank r takes positions r, r + R', ...). Every sample of the epoch is therefore trained exactly once, plus
``(-(n - C)) % R'`` padding repeats of ``order[0], order[1], ...`` (none with ``drop_last``, which instead leaves out
up to R' - 1 samples of the tail, as DistributedSampler does). With the same replicas and batch size this is the
uninterrupted run's order exactly.

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
        self._resume_consumed = 0  # global samples of the resumed epoch trained before the checkpoint
        self._resume_batch_idx = -1  # the loop's batch index at that checkpoint
        self._pass_base: tuple[int, int, int] | None = None  # (epoch, batch_idx, consumed) of a resumed pass
        self._on_resume_iter: Callable[[], None] | None = None

    # -- sizes -------------------------------------------------------------------------------------------------
    def _share(self, count: int) -> int:
        """Samples each replica gets when ``count`` samples are split DistributedSampler's way."""
        if self.drop_last and count % self.num_replicas:
            return count // self.num_replicas
        return math.ceil(count / self.num_replicas)

    def _per_replica(self) -> int:
        return self._share(len(self.data_source))

    def _consumed(self) -> int:
        """Global samples the next pass starts after (non-zero only on the pass being resumed)."""
        return self._resume_consumed if self._resume_epoch == self.epoch else 0

    def __len__(self) -> int:
        """Samples the next iteration yields (fewer than a full epoch on the pass being resumed)."""
        consumed = self._consumed()
        if not consumed:
            return self._per_replica()
        return self._share(max(len(self.data_source) - consumed, 0))

    # -- order -------------------------------------------------------------------------------------------------
    def _order(self) -> torch.Tensor:
        """The epoch's global order of all samples (before padding and striding), as an int64 tensor."""
        n = len(self.data_source)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(n, generator=g)
        return torch.arange(n)

    def _split(self, order: torch.Tensor, consumed: int) -> list[int]:
        """This replica's share of ``order[consumed:]``, padded from the epoch's first samples. Sliced as a tensor
        (views), so only this replica's share of the pass becomes a Python list."""
        rest = order[consumed:]
        total = self._share(len(rest)) * self.num_replicas
        if total > len(rest) and len(order):  # pad by repeating the epoch's first samples, as DistributedSampler does
            reps = math.ceil((total - len(rest)) / len(order))
            rest = torch.cat([rest, order.repeat(reps)[: total - len(rest)]])
        return rest[:total][self.rank : total : self.num_replicas].tolist()

    def _indices(self) -> list[int]:
        return self._split(self._order(), 0)

    def __iter__(self) -> Iterator[int]:
        consumed = self._consumed()
        self._pass_base = None
        if self._resume_epoch == self.epoch:
            self._resume_epoch = None  # one resumed pass; later passes of any epoch start at 0
            self._pass_base = (self.epoch, self._resume_batch_idx, consumed)
            hook, self._on_resume_iter = self._on_resume_iter, None
            if hook is not None:
                hook()
        return iter(self._split(self._order(), consumed))

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
        self.epoch = int(state.get("epoch", self.epoch))
        pos = state.get("position")
        if pos and int(pos.get("batch_idx", -1)) >= 0:
            self._resume_epoch = int(pos["epoch"])
            self._resume_batch_idx = int(pos["batch_idx"])
            self._resume_consumed = _samples_consumed(pos, state, self)
            self._log_elastic(state)
        else:
            self._resume_epoch, self._resume_consumed, self._resume_batch_idx = None, 0, -1

    def _log_elastic(self, state: dict[str, Any]) -> None:
        saved = (state.get("num_replicas", self.num_replicas), state.get("batch_size", self.batch_size))
        if saved != (self.num_replicas, self.batch_size):
            log.info(
                "ResumableSampler: epoch %d was saved with %d replicas x batch %d, resumes with %d x %d: the rest "
                "of its global order (after %d samples) is split over the new replicas",
                self._resume_epoch,
                saved[0],
                saved[1],
                self.num_replicas,
                self.batch_size,
                self._resume_consumed,
            )

    # -- resume hooks (syncckpt.restore) ------------------------------------------------------------------------
    def checkpoint_position(self, epoch: int, batch_idx: int) -> dict[str, Any]:
        """Saved with the state: the loop position and the global samples consumed in ``epoch``, so a resumed pass
        (with any number of replicas or batch size) starts right after what was trained.

        On the pass being resumed the loop's ``batch_idx`` continues the saved run's numbering; the batches since
        then are counted in this run's replicas and batch size.
        """
        consumed = (batch_idx + 1) * self.batch_size * self.num_replicas
        base = self._pass_base
        if base is not None and base[0] == epoch and batch_idx >= 0:
            consumed = base[2] + (batch_idx - base[1]) * self.batch_size * self.num_replicas
        return {"position": {"epoch": epoch, "batch_idx": batch_idx, "samples_consumed": max(consumed, 0)}}

    def on_resumed_pass(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` when the pass being resumed begins (after the DataLoader drew its worker seed)."""
        self._on_resume_iter = hook


def _samples_consumed(pos: dict[str, Any], state: dict[str, Any], sampler: ResumableSampler) -> int:
    """Global samples consumed at a saved position; a checkpoint from before ``samples_consumed`` was saved counts
    its per-replica batches in the saved batch size and number of replicas."""
    if "samples_consumed" in pos:
        return int(pos["samples_consumed"])
    per_batch = int(state.get("batch_size", sampler.batch_size)) * int(state.get("num_replicas", sampler.num_replicas))
    return (int(pos["batch_idx"]) + 1) * per_batch
