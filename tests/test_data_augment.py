"""syncckpt.augment: per-sample randomness from (seed, epoch, index): the same with any num_workers, after a resume."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from syncckpt import ResumableSampler
from syncckpt.augment import PerSampleRandom, sample_generator, sample_seed


def crop_and_noise(sample, g: torch.Generator):
    (img,) = sample
    top, left = (int(v) for v in torch.randint(0, 3, (2,), generator=g))
    crop = img[:, top : top + 4, left : left + 4]
    return crop + torch.randn(crop.shape, generator=g)


def _pass(num_workers: int, epoch: int = 0, position: dict | None = None) -> torch.Tensor:
    imgs = torch.randn(20, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    ds = PerSampleRandom(TensorDataset(imgs), crop_and_noise, seed=3)
    sampler = ResumableSampler(ds, batch_size=4, seed=1)
    if position is not None:
        sampler.load_state_dict({**sampler.state_dict(), "position": position})
    sampler.set_epoch(epoch)
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=num_workers)
    return torch.cat(list(loader))


def test_augmentations_do_not_depend_on_num_workers():
    ref = _pass(0)
    assert torch.equal(_pass(3), ref)
    assert not torch.equal(_pass(0, epoch=1), ref)  # another epoch, other crops and noise


def test_augmentations_of_a_resumed_pass_are_the_uninterrupted_ones():
    full = _pass(2)
    rest = _pass(2, position={"epoch": 0, "batch_idx": 1, "samples_consumed": 8})
    assert torch.equal(rest, full[8:])


def test_worker_streams_would_differ_which_is_what_the_wrapper_avoids():
    """The problem solved: randomness from the worker's own torch stream changes with num_workers."""

    class WorkerRandom(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.rand(1)

    torch.manual_seed(0)
    zero = torch.cat(list(DataLoader(WorkerRandom(), batch_size=2, num_workers=0)))
    torch.manual_seed(0)
    two = torch.cat(list(DataLoader(WorkerRandom(), batch_size=2, num_workers=2)))
    assert not torch.equal(zero, two)


@pytest.mark.parametrize("other", [(1, 0, 5), (0, 1, 5), (0, 0, 6)])
def test_seed_changes_with_seed_epoch_and_index(other):
    assert sample_seed(0, 0, 5) != sample_seed(*other)
    assert 0 <= sample_seed(*other) < 2**63


def test_generator_is_reproducible():
    a = torch.rand(4, generator=sample_generator(2, 3, 4))
    assert torch.equal(a, torch.rand(4, generator=sample_generator(2, 3, 4)))
