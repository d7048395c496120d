"""Streamed Hugging Face datasets resume through their own state: ShuffleBuffer, workers, split_dataset_by_node."""

from __future__ import annotations

import pytest
import torch

from syncckpt import CheckpointManager
from syncckpt.data import ShuffleBuffer

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
StatefulDataLoader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
SHARDS, ROWS = 4, 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """Parquet shards written here (nothing is downloaded): rows {"idx": i}."""
    d = tmp_path_factory.mktemp("parquet")
    paths = []
    for s in range(SHARDS):
        path = d / f"part-{s}.parquet"
        pq.write_table(pa.table({"idx": list(range(s * ROWS, (s + 1) * ROWS))}), path)
        paths.append(str(path))
    return paths


def _stream(shards: list[str], rank: int | None = None, world: int = 1):
    ds = datasets.load_dataset("parquet", data_files=shards, split="train", streaming=True)
    if rank is not None:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(ds, rank=rank, world_size=world)
    return ds


def _loader(shards, *, buffer=6, workers=2, rank=None, world=1, epoch=0):
    stream = ShuffleBuffer(_stream(shards, rank, world), buffer_size=buffer, seed=1)
    stream.set_epoch(epoch)
    return StatefulDataLoader(stream, batch_size=3, num_workers=workers)


def _ids(batches) -> list[list[int]]:
    return [b["idx"].tolist() for b in batches]


def _resume(tmp_path, loader, fresh, batch_idx: int) -> None:
    with CheckpointManager(tmp_path, handle_sigterm=False) as mgr:
        mgr.register(loader=loader)
        mgr.save(1, epoch=0, batch_idx=batch_idx)
        assert mgr.wait()
        mgr.register(loader=fresh)
        assert mgr.resume() is not None


@pytest.mark.parametrize("workers", [0, 2])
def test_shuffled_stream_resumes_mid_epoch_exactly(tmp_path, shards, workers):
    full = _ids(_loader(shards, workers=workers))
    assert sorted(i for b in full for i in b) == list(range(SHARDS * ROWS))
    assert [i for b in full for i in b] != list(range(SHARDS * ROWS))  # shuffled
    loader = _loader(shards, workers=workers)
    it = iter(loader)
    head = [next(it)["idx"].tolist() for _ in range(5)]
    fresh = _loader(shards, workers=workers)
    _resume(tmp_path, loader, fresh, batch_idx=4)
    assert head + _ids(fresh) == full
    list(it)


def test_shuffle_order_changes_with_the_epoch(shards):
    assert _ids(_loader(shards, epoch=0)) != _ids(_loader(shards, epoch=1))


def test_split_by_node_each_node_resumes_exactly_and_the_nodes_cover_the_stream_once(tmp_path, shards):
    every = []
    for rank in (0, 1):
        full = _ids(_loader(shards, rank=rank, world=2))
        loader = _loader(shards, rank=rank, world=2)
        it = iter(loader)
        head = [next(it)["idx"].tolist() for _ in range(2)]
        fresh = _loader(shards, rank=rank, world=2)
        _resume(tmp_path / str(rank), loader, fresh, batch_idx=1)
        assert head + _ids(fresh) == full
        every += [i for b in full for i in b]
        list(it)
    assert sorted(every) == list(range(SHARDS * ROWS))


def test_datasets_own_shuffle_buffer_loses_examples_on_resume_which_shufflebuffer_does_not(shards):
    """Why ShuffleBuffer exists: ``datasets`` does not save its buffer's content and refills it on resume."""

    def rows(paths):
        for path in paths:
            yield from pq.read_table(path).to_pylist()

    def own(state=None):  # from_generator: the same rows as the parquet stream, without its slow resume path
        ds = datasets.IterableDataset.from_generator(rows, gen_kwargs={"paths": shards}).shuffle(seed=1, buffer_size=8)
        if state is not None:
            ds.load_state_dict(state)
        return ds

    ds = own()
    it = iter(ds)
    head = [next(it)["idx"] for _ in range(7)]
    rest = [r["idx"] for r in own(state=ds.state_dict())]
    assert len(head) + len(rest) < SHARDS * ROWS  # examples held in the buffer at the save are gone

    src = ShuffleBuffer(_stream(shards), buffer_size=8, seed=1)
    it = iter(src)
    head = [next(it)["idx"] for _ in range(7)]
    again = ShuffleBuffer(_stream(shards), buffer_size=8, seed=1)
    again.load_state_dict(src.state_dict())
    assert sorted(head + [r["idx"] for r in again]) == list(range(SHARDS * ROWS))


def test_a_source_without_state_is_refused():
    with pytest.raises(TypeError, match="state_dict/load_state_dict"):
        ShuffleBuffer(range(4), buffer_size=2)
    with pytest.raises(ValueError, match="buffer_size"):
        ShuffleBuffer(_stream_stub(), buffer_size=0)


def _stream_stub():
    return torch.nn.Linear(1, 1)  # has state_dict/load_state_dict
