"""ResumableSampler: DistributedSampler's order, exact mid-epoch resume without touching skipped samples."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from syncckpt import ResumableSampler

REPLICAS = [(1, 0), (2, 0), (2, 1), (3, 2)]


class CountingDataset(Dataset):
    """Returns its index; counts __getitem__ calls (in the process that makes them)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.calls.append(i)
        return i


def order_of(sampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def resumed(n: int, bs: int, epoch: int, batch_idx: int, **kw) -> ResumableSampler:
    """A fresh sampler restored from a state saved at (epoch, batch_idx), as the manager does it."""
    saved = ResumableSampler(range(n), bs, **kw)
    saved.set_epoch(epoch)
    state = {**saved.state_dict(), "position": {"epoch": epoch, "batch_idx": batch_idx}}
    s = ResumableSampler(range(n), bs, **kw)
    s.load_state_dict(state)
    return s


@pytest.mark.parametrize("replicas,rank", REPLICAS)
@pytest.mark.parametrize("n", [23, 24, 2])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_same_order_as_distributed_sampler(replicas, rank, n, drop_last, shuffle):
    ds = range(n)
    ours = ResumableSampler(ds, 4, shuffle=shuffle, seed=17, drop_last=drop_last, num_replicas=replicas, rank=rank)
    ref = DistributedSampler(ds, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=17, drop_last=drop_last)
    for epoch in (0, 1, 5):
        expected = order_of(ref, epoch)
        assert order_of(ours, epoch) == expected, (epoch, expected)
        assert len(ours) == len(ref) == len(expected)


def test_default_is_one_replica_when_not_distributed():
    s = ResumableSampler(range(10), 2)
    assert (s.num_replicas, s.rank) == (1, 0)
    assert sorted(order_of(s, 0)) == list(range(10))


def test_different_epochs_and_seeds_give_different_orders():
    s = ResumableSampler(range(50), 5, seed=1)
    assert order_of(s, 0) != order_of(s, 1)
    assert order_of(s, 0) != order_of(ResumableSampler(range(50), 5, seed=2), 0)


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(rank=2, num_replicas=2), dict(rank=-1, num_replicas=2)])
def test_invalid_arguments_are_refused(bad):
    kw = dict(batch_size=2, num_replicas=1, rank=0) | bad
    with pytest.raises(ValueError):
        ResumableSampler(range(10), **kw)


@pytest.mark.parametrize("replicas,rank", REPLICAS)
@pytest.mark.parametrize("batch_idx", [0, 2, 4, 5])
@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_yields_the_rest_of_the_uninterrupted_epoch(replicas, rank, batch_idx, drop_last):
    n, bs, epoch = 47, 4, 3
    kw = dict(shuffle=True, seed=5, drop_last=drop_last, num_replicas=replicas, rank=rank)
    straight = ResumableSampler(range(n), bs, **kw)
    full = order_of(straight, epoch)
    s = resumed(n, bs, epoch, batch_idx, **kw)
    s.set_epoch(epoch)
    assert len(s) == len(full[(batch_idx + 1) * bs :])
    rest = list(s)
    assert rest == full[(batch_idx + 1) * bs :]
    assert len(rest) == max(len(full) - (batch_idx + 1) * bs, 0)
    # later passes are full: the next epoch, and even the same epoch again
    assert order_of(s, epoch + 1) == order_of(straight, epoch + 1)
    assert len(s) == len(full)
    assert order_of(s, epoch) == full


def test_resume_after_the_last_batch_yields_nothing_then_full_epochs():
    s = resumed(10, 2, 0, 4, seed=0)
    s.set_epoch(0)
    assert len(s) == 0 and list(s) == []
    assert len(order_of(s, 1)) == 10


def test_position_with_batch_idx_minus_one_means_no_skip():
    s = resumed(10, 2, 1, -1, seed=0)
    assert order_of(s, 1) == order_of(ResumableSampler(range(10), 2, seed=0), 1)


def test_load_state_dict_restores_seed_and_shuffle():
    saved = ResumableSampler(range(20), 4, shuffle=True, seed=99)
    s = ResumableSampler(range(20), 4, shuffle=False, seed=0)
    s.load_state_dict(saved.state_dict())
    assert (s.seed, s.shuffle) == (99, True)
    assert order_of(s, 2) == order_of(saved, 2)


def test_skip_does_not_load_skipped_samples():
    n, bs, epoch, batch_idx = 40, 4, 2, 6
    full = order_of(ResumableSampler(range(n), bs, seed=3), epoch)
    ds = CountingDataset(n)
    s = resumed(n, bs, epoch, batch_idx, seed=3)
    s.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=bs, sampler=s)
    assert len(loader) == 3  # a progress bar over the resumed pass shows the remaining batches
    got = [int(i) for batch in loader for i in batch]
    assert got == full[(batch_idx + 1) * bs :]
    assert ds.calls == got  # __getitem__ ran for the remaining samples only


def test_works_with_dataloader_workers():
    n, bs, epoch, batch_idx = 37, 3, 1, 4
    full = order_of(ResumableSampler(range(n), bs, seed=8), epoch)
    s = resumed(n, bs, epoch, batch_idx, seed=8)
    s.set_epoch(epoch)
    loader = DataLoader(CountingDataset(n), batch_size=bs, sampler=s, num_workers=2)
    assert [int(i) for batch in loader for i in batch] == full[(batch_idx + 1) * bs :]
    s.set_epoch(epoch + 1)
    assert [int(i) for batch in loader for i in batch] == order_of(ResumableSampler(range(n), bs, seed=8), epoch + 1)


def test_state_dict_is_plain_data():
    state = ResumableSampler(range(10), 2, seed=4, num_replicas=2, rank=1).state_dict()
    assert state == {
        "seed": 4,
        "shuffle": True,
        "epoch": 0,
        "batch_size": 2,
        "num_samples": 10,
        "num_replicas": 2,
        "rank": 1,
        "drop_last": False,
    }


def test_dataset_size_change_is_warned(caplog):
    saved = ResumableSampler(range(10), 2)
    s = ResumableSampler(range(12), 2)
    s.load_state_dict(saved.state_dict())
    assert "10 samples" in caplog.text and "12" in caplog.text


def test_resume_hook_runs_when_the_resumed_pass_begins():
    s = resumed(10, 2, 0, 1, seed=0)
    ran = []
    s.on_resumed_pass(lambda: ran.append(True))
    s.set_epoch(0)
    assert ran == []
    it = iter(s)
    assert ran == [True]
    list(it)
    order_of(s, 0)
    assert ran == [True]


def test_generator_is_not_the_global_rng():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    order_of(ResumableSampler(range(100), 10, seed=1), 0)
    assert torch.equal(torch.rand(1), before)


# ---- elastic position: global samples consumed ----------------------------------------------------------------------
def _ranks(n: int, bs: int, replicas: int, state: dict | None = None, **kw) -> list[ResumableSampler]:
    samplers = [ResumableSampler(range(n), bs, num_replicas=replicas, rank=r, **kw) for r in range(replicas)]
    for s in samplers:
        if state is not None:
            s.load_state_dict(state)
    return samplers


def _train(samplers: list[ResumableSampler], epoch: int, first: int, stop_after: int | None):
    """Lockstep data-parallel pass: every rank takes one batch per step, as DDP does. Returns the sample indices
    trained, the state saved at the last step (rank 0's, with its position, as the manager saves it)."""
    batches = []
    for s in samplers:
        s.set_epoch(epoch)
        idx = list(s)
        batches.append([idx[i : i + s.batch_size] for i in range(0, len(idx), s.batch_size)])
    trained, state = [], None
    for k, step in enumerate(zip(*batches, strict=True)):
        trained += [i for b in step for i in b]
        batch_idx = first + k
        state = {**samplers[0].state_dict(), **samplers[0].checkpoint_position(epoch, batch_idx)}
        if stop_after is not None and k + 1 == stop_after:
            break
    return trained, state


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(
    "plan",
    [
        [(2, 4, 3), (1, 4, None)],  # 2 replicas -> 1
        [(1, 4, 5), (2, 4, None)],  # 1 -> 2
        [(2, 4, 2), (3, 4, None)],  # 2 -> 3
        [(2, 4, 3), (2, 3, None)],  # batch size 4 -> 3
        [(2, 4, 2), (1, 4, 4), (2, 5, None)],  # 2 -> 1 -> 2 within one epoch, batch size changed on the way
    ],
)
def test_resuming_with_other_replicas_or_batch_size_trains_every_sample_of_the_epoch_once(plan, drop_last):
    n, epoch, kw = 61, 2, dict(shuffle=True, seed=11, drop_last=drop_last)
    order = order_of(ResumableSampler(range(n), 1, **kw), epoch)  # the epoch's global order (1 replica)
    trained, state, first = [], None, 0
    for replicas, bs, steps in plan:
        got, state = _train(_ranks(n, bs, replicas, state, **kw), epoch, first, steps)
        trained += got
        first = state["position"]["batch_idx"] + 1
        assert state["position"]["samples_consumed"] == len(trained) or steps is None
    consumed_before_last = len(trained) - len(got)
    # one global order across the segments: what was trained before the last resume is the order's first C samples
    assert sorted(trained[:consumed_before_last]) == sorted(order[:consumed_before_last])
    last_replicas = plan[-1][0]
    rest = n - consumed_before_last
    if drop_last:  # the tail that does not split evenly is left out, as DistributedSampler does
        dropped = rest % last_replicas
        assert sorted(trained) == sorted(order[: n - dropped])
    else:  # the rule: padding repeats the epoch's first samples, (-(n - C)) % R' of them
        pad = -rest % last_replicas
        assert sorted(trained) == sorted(list(range(n)) + order[:pad])


def test_same_replicas_and_batch_size_give_the_uninterrupted_order():
    n, kw = 50, dict(shuffle=True, seed=3)
    straight, _ = _train(_ranks(n, 4, 2, **kw), 0, 0, None)
    part, state = _train(_ranks(n, 4, 2, **kw), 0, 0, 3)
    rest, _ = _train(_ranks(n, 4, 2, state, **kw), 0, 3, None)
    assert part + rest == straight


def test_position_is_saved_in_global_samples_consumed():
    s = ResumableSampler(range(100), 4, num_replicas=2, rank=1)
    assert s.checkpoint_position(0, 2) == {"position": {"epoch": 0, "batch_idx": 2, "samples_consumed": 24}}
    assert s.checkpoint_position(1, -1)["position"]["samples_consumed"] == 0


def test_a_checkpoint_saved_without_samples_consumed_still_resumes():
    """The format before the elastic position: {epoch, batch_idx} counted in the saved per-replica batch size."""
    old = {
        **ResumableSampler(range(40), 4, num_replicas=2, rank=0).state_dict(),
        "position": {"epoch": 1, "batch_idx": 2},
    }
    full, _ = _train(_ranks(40, 4, 2), 1, 0, None)
    rest, _ = _train(_ranks(40, 4, 2, old), 1, 3, None)
    assert rest == full[24:]
    one = _ranks(40, 4, 1, old)[0]  # and with another world size: 24 global samples were consumed
    one.set_epoch(1)
    assert list(one) == order_of(ResumableSampler(range(40), 4), 1)[24:]


def test_replica_change_is_logged(caplog):
    _, state = _train(_ranks(30, 2, 2), 0, 0, 2)
    caplog.set_level("INFO", logger="syncckpt")
    _ranks(30, 2, 3, state)
    assert "saved with 2 replicas x batch 2, resumes with 3 x 2" in caplog.text
