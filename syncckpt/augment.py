"""Deterministic augmentations: per-sample randomness drawn from (seed, epoch, sample index), opt-in.

A random crop or noise drawn from a DataLoader worker's own stream depends on which worker loads the sample, on
how many samples that worker loaded before it, and on the seed the pass drew: it changes with ``num_workers`` and
is not reproduced by a resumed pass. :class:`PerSampleRandom` hands the transform a ``torch.Generator`` seeded
from ``(seed, epoch, index)`` instead, so every sample's augmentation is a pure function of where it is in the
run: identical after a resume, with any ``num_workers`` (0, 2, 3...), on any rank.

The trade-off: the transform must draw from the generator it is given (``torch.rand(..., generator=g)``,
``torch.randint(..., generator=g)``), not from ``random``/``numpy``'s global state or from library transforms that
use torch's global generator; a fresh generator per sample costs a few microseconds; and a sample seen twice in
one epoch (padding, sampling with replacement) gets the same augmentation both times.

>>> import torch
>>> def noisy(x, g): return x + torch.randn(x.shape, generator=g)
>>> ds = PerSampleRandom([torch.zeros(2)] * 4, noisy, seed=7)
>>> a = ds[1]; torch.equal(a, ds[1]), torch.equal(a, ds[2])
(True, False)
>>> ds.set_epoch(1); torch.equal(a, ds[1])
False
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch.utils.data import Dataset

__all__ = ["PerSampleRandom", "sample_generator", "sample_seed"]

T = TypeVar("T")
_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit value for each input."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's randomness: the same in every process and session, distinct across the three.

    >>> sample_seed(0, 0, 1) == sample_seed(0, 0, 1) != sample_seed(0, 1, 1)
    True
    """
    return _mix(_mix(_mix(int(seed) & _MASK) ^ (int(epoch) & _MASK)) ^ (int(index) & _MASK)) >> 1  # < 2**63


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for one sample: use it in a transform of a stream (where :class:`PerSampleRandom`
    does not apply) with the example's own index, e.g. an ``idx`` column.

    >>> a, b = sample_generator(1, 0, 5), sample_generator(1, 0, 5)
    >>> torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    True
    """
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


class PerSampleRandom(Dataset):
    """Wrap a map-style dataset so ``transform(sample, generator)`` draws from a per-sample generator.

    Args:
        dataset: any map-style dataset (``__getitem__`` and ``__len__``).
        transform: ``transform(sample, generator) -> sample``; every random draw must use ``generator``.
        seed: base seed (the run's seed).

    Call :meth:`set_epoch` before each epoch (with ResumableSampler's ``set_epoch``); DataLoader workers get a
    fresh copy of the dataset at every pass, so the epoch reaches them. Not with ``persistent_workers=True``: those
    workers keep the copy of their first pass and would repeat its epoch's augmentations.
    """

    def __init__(self, dataset: Sequence[T] | Dataset, transform: Callable[[Any, torch.Generator], Any], seed: int = 0):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations the next pass draws."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.transform(self.dataset[index], sample_generator(self.seed, self.epoch, int(index)))
