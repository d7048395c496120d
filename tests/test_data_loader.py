"""syncckpt.data: torchdata's StatefulDataLoader through syncckpt's format, ResumableLoader, the count fallback."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from syncckpt import CheckpointManager
from syncckpt.data import ResumableLoader
from syncckpt.errors import StateNotSerializable

torchdata = pytest.importorskip("torchdata.stateful_dataloader")
StatefulDataLoader = torchdata.StatefulDataLoader

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


class Counting(IterableDataset):
    """A plain stream without state; counts the samples it produced (in this process: num_workers=0)."""

    def __init__(self, n: int) -> None:
        self.n, self.produced = n, 0

    def __iter__(self):
        for i in range(self.n):
            self.produced += 1
            yield i


class Stateful(Counting):
    """The same stream with state_dict/load_state_dict, holding a value that is not JSON."""

    def __init__(self, n: int, bad=None) -> None:
        super().__init__(n)
        self.bad = bad

    def state_dict(self):
        return {"bad": self.bad} if self.bad is not None else {}

    def load_state_dict(self, state):
        pass


def _save_and_resume(tmp_path, obj, fresh, *, epoch=0, batch_idx=0, **extra):
    """Save ``obj`` in a checkpoint, then resume ``fresh`` from it in a new manager."""
    with CheckpointManager(tmp_path, handle_sigterm=False) as mgr:
        mgr.register(model=torch.nn.Linear(1, 1), loader=obj, **extra)
        mgr.save(1, epoch=epoch, batch_idx=batch_idx)
        assert mgr.wait()
    with CheckpointManager(tmp_path, handle_sigterm=False) as mgr:
        mgr.register(model=torch.nn.Linear(1, 1), loader=fresh, **extra)
        return mgr.resume()


def _map_loader(num_workers: int):
    torch.manual_seed(0)  # the RandomSampler's generator is seeded from the global one
    ds = TensorDataset(torch.arange(30))
    return StatefulDataLoader(ds, batch_size=3, shuffle=True, num_workers=num_workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_dataloader_registered_directly_continues_the_pass_exactly(tmp_path, num_workers):
    full = [b[0].tolist() for b in _map_loader(num_workers)]
    loader = _map_loader(num_workers)
    it = iter(loader)
    head = [next(it)[0].tolist() for _ in range(4)]
    _save_and_resume(tmp_path, loader, fresh := _map_loader(num_workers), batch_idx=3)
    list(it)  # end the saved pass: its workers exit now rather than at garbage collection (a 5 s join each)
    assert head + [b[0].tolist() for b in fresh] == full
    assert [b[0].tolist() for b in fresh] == [b[0].tolist() for b in _next_epoch(num_workers)]


def _next_epoch(num_workers: int):
    """The second pass of an uninterrupted loader (what the resumed loader's next epoch must give)."""
    loader = _map_loader(num_workers)
    list(loader)
    return loader


def test_stateful_loader_state_is_stored_without_pickle(tmp_path):
    import json

    loader = _map_loader(2)
    it = iter(loader)
    next(it)
    _save_and_resume(tmp_path, loader, _map_loader(2))
    list(it)  # end the pass: its workers exit now rather than at garbage collection
    state = json.loads((tmp_path / "checkpoint-step-1" / "state.json").read_text())["objects"]["loader"]
    assert state["_snapshot"]["_main_snapshot"]["_num_workers"] == 2
    generator = state["_snapshot"]["_main_snapshot"]["_sampler_iter_state"]["sampler_iter_state"]["generator"]
    assert list(generator) == ["__tensor__"]  # the sampler's generator state went to loader.safetensors


def test_a_leaf_that_is_not_json_is_refused_with_its_key_path(tmp_path):
    loader = StatefulDataLoader(Stateful(10, bad={1, 2}), batch_size=2)
    next(iter(loader))
    with CheckpointManager(tmp_path, handle_sigterm=False) as mgr:
        mgr.register(loader=loader)
        with pytest.raises(StateNotSerializable, match=r"'loader\.dataset_state\.bad': value of type builtins\.set"):
            mgr.save(1, epoch=0, batch_idx=0)


def test_resumable_loader_reapplies_the_rng_after_the_pass_drew_its_worker_seed(tmp_path):
    loader = ResumableLoader(_map_loader(0))
    it = iter(loader)
    next(it)
    fresh = ResumableLoader(_map_loader(0))
    with CheckpointManager(tmp_path, handle_sigterm=False) as mgr:
        mgr.register(loader=loader)
        torch.manual_seed(123)
        mgr.save(1, epoch=0, batch_idx=0)  # the RNG streams are captured here
        expected = torch.rand(3)  # what the uninterrupted run draws next (its pass drew its seed before the save)
        assert mgr.wait()
        mgr.register(loader=fresh)
        mgr.resume()
    iter(fresh)  # draws the worker seed from the global RNG...
    assert torch.equal(torch.rand(3), expected)  # ...and the saved streams are re-applied after that draw


def test_count_fallback_skips_by_reading_with_a_warning_and_a_progress_bar(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="syncckpt")
    loader = ResumableLoader(DataLoader(Counting(20), batch_size=2))
    it = iter(loader)
    head = [next(it).tolist() for _ in range(3)]
    stream = Counting(20)
    fresh = ResumableLoader(DataLoader(stream, batch_size=2))
    _save_and_resume(tmp_path, loader, fresh, batch_idx=2)
    assert "skips 3 trained batches by reading them again" in caplog.text
    rest = [b.tolist() for b in fresh]
    assert head + rest == [[i, i + 1] for i in range(0, 20, 2)]
    assert stream.produced == 20  # the cost: the skipped samples were produced again
    assert "skipping trained batches" in capsys.readouterr().err  # tqdm's bar
    assert "skipped 3 batches in" in caplog.text
    assert [b.tolist() for b in fresh][:1] == [[0, 1]]  # later passes start at 0


def test_count_fallback_for_a_stateful_loader_over_a_stream_without_state(tmp_path, caplog):
    loader = ResumableLoader(StatefulDataLoader(Counting(12), batch_size=3))
    assert not loader.stateful
    it = iter(loader)
    next(it)
    fresh = ResumableLoader(StatefulDataLoader(Counting(12), batch_size=3), progress=False)
    _save_and_resume(tmp_path, loader, fresh, batch_idx=0)
    assert [b.tolist() for b in fresh] == [[3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert "has no state_dict" in caplog.text


def test_epoch_checkpoint_skips_nothing(tmp_path):
    loader = ResumableLoader(DataLoader(Counting(6), batch_size=2))
    list(loader)
    fresh = ResumableLoader(DataLoader(Counting(6), batch_size=2))
    _save_and_resume(tmp_path, loader, fresh, batch_idx=-1)
    assert len(list(fresh)) == 3


def test_mixing_a_count_checkpoint_and_a_stateful_loader_is_refused():
    fresh = ResumableLoader(_map_loader(0))
    with pytest.raises(ValueError, match="counted batches"):
        fresh.load_state_dict({"skip_by_count": True, "position": {"epoch": 0, "batch_idx": 1}})
    with warnings.catch_warnings():
        plain = ResumableLoader(DataLoader(Counting(4)))
    with pytest.raises(ValueError, match="stateful loader's state"):
        plain.load_state_dict({"_snapshot": {}})
