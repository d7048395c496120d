"""Snapshots: a consistent host copy of the registered state in staging buffers that are reused between saves,
the non-finite check on that copy, registered-name rules and the sizes used to prefault the buffers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from syncckpt.format import iter_file_chunks, load_safetensors_bytes, unflatten_state
from syncckpt.snapshot import RESERVED, StagingArena, check_object_name, collect_state, state_sizes, take_snapshot


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def file_bytes(snap, filename: str) -> bytes:
    [i] = [i for i, lay in enumerate(snap.layouts) if lay.filename == filename]
    return b"".join(bytes(c) for c in iter_file_chunks(snap.layouts[i], snap.buffers[i]))


def restored(snap, name: str):
    """What a reader gets back for object ``name`` from the snapshot's bytes."""
    tensors = {}
    if any(lay.filename == f"{name}.safetensors" for lay in snap.layouts):
        tensors = load_safetensors_bytes(file_bytes(snap, f"{name}.safetensors"), where=name)
    return unflatten_state(snap.structure[name], tensors)


def assert_same_state(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


class Counter:
    """A user object whose state is plain data."""

    def __init__(self) -> None:
        self.n = 3

    def state_dict(self) -> dict:
        return {"n": self.n, "history": [1.5, 2.5], "pair": (1, "a")}


# ---- take_snapshot ---------------------------------------------------------------------------------------------
def test_a_snapshot_holds_every_object_and_reads_back_exactly():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    train_step(model, opt)
    objects = {"model": model, "optimizer": opt, "counter": Counter()}
    snap = take_snapshot(collect_state(objects), StagingArena())
    assert sorted(lay.filename for lay in snap.layouts) == ["model.safetensors", "optimizer.safetensors"]
    assert sorted(snap.structure) == ["counter", "model", "optimizer"]
    assert_same_state(restored(snap, "model"), model.state_dict())
    opt_state = restored(snap, "optimizer")
    assert opt_state["param_groups"] == opt.state_dict()["param_groups"]
    for pid, st in opt.state_dict()["state"].items():
        assert_same_state(opt_state["state"][pid], st)
    assert restored(snap, "counter") == {"n": 3, "history": [1.5, 2.5], "pair": (1, "a")}
    assert snap.nbytes == sum(lay.data_size for lay in snap.layouts)


def test_the_snapshot_is_a_copy_that_training_on_does_not_change():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snap = take_snapshot(collect_state({"model": model}), StagingArena())
    train_step(model, opt)
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    assert_same_state(restored(snap, "model"), before)
    assert snap.nonfinite_tensors() == []  # the check reads the copy, not the live tensors


def test_staging_buffers_are_reused_from_one_save_to_the_next():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    arena = StagingArena()
    first = take_snapshot(collect_state({"model": model}), arena)
    pointers, size = [b.data_ptr() for b in first.buffers], arena.nbytes
    for _ in range(3):
        train_step(model, opt)
        snap = take_snapshot(collect_state({"model": model}), arena)
        assert [b.data_ptr() for b in snap.buffers] == pointers  # no new allocation, no new page faults
        assert arena.nbytes == size
    assert_same_state(restored(snap, "model"), model.state_dict())


def test_buffers_grow_when_the_state_grows_and_are_kept_when_it_shrinks():
    arena = StagingArena()
    take_snapshot({"model": {"w": torch.zeros(100)}}, arena)
    small = arena.nbytes
    grown = take_snapshot({"model": {"w": torch.ones(1000)}}, arena)
    assert arena.nbytes >= 4000 > small
    assert torch.equal(restored(grown, "model")["w"], torch.ones(1000))
    pointer = grown.buffers[0].data_ptr()
    shrunk = take_snapshot({"model": {"w": torch.full((10,), 2.0)}}, arena)
    assert shrunk.buffers[0].data_ptr() == pointer and arena.nbytes >= 4000
    assert torch.equal(restored(shrunk, "model")["w"], torch.full((10,), 2.0))


def test_the_layout_is_planned_once_while_names_dtypes_and_shapes_stay_the_same():
    arena = StagingArena()
    first = take_snapshot({"model": {"w": torch.zeros(4, 3), "b": torch.zeros(3)}}, arena)
    again = take_snapshot({"model": {"w": torch.ones(4, 3), "b": torch.full((3,), 2.0)}}, arena)
    assert again.layouts[0] is first.layouts[0]  # the same plan (and views), no new header built
    assert_same_state(restored(again, "model"), {"w": torch.ones(4, 3), "b": torch.full((3,), 2.0)})
    changes = [
        {"w": torch.ones(3, 4), "b": torch.zeros(3)},  # another shape, same size
        {"w": torch.ones(4, 3, dtype=torch.float64), "b": torch.zeros(3)},  # another dtype
        {"w": torch.ones(4, 3), "c": torch.zeros(3)},  # another name
    ]
    for state in changes:
        snap = take_snapshot({"model": state}, arena)
        assert snap.layouts[0] is not first.layouts[0]
        assert_same_state(restored(snap, "model"), state)


def test_each_object_gets_its_own_buffer():
    arena = StagingArena()
    snap = take_snapshot({"a": {"w": torch.ones(10)}, "b": {"w": torch.full((10,), 2.0)}}, arena)
    assert len({b.data_ptr() for b in snap.buffers}) == 2
    assert torch.equal(restored(snap, "a")["w"], torch.ones(10))
    assert torch.equal(restored(snap, "b")["w"], torch.full((10,), 2.0))


def test_views_dtypes_empty_and_scalar_tensors_are_copied_exactly():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "transposed": base.t(),  # not contiguous
        "sliced": base[:, 1::2],
        "half": torch.randn(5).half(),
        "bf16": torch.randn(5).bfloat16(),
        "ids": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }
    got = restored(take_snapshot({"obj": state}, StagingArena()), "obj")
    assert_same_state(got, {k: v.contiguous() for k, v in state.items()})
    assert got["empty"].shape == (0, 3) and got["scalar"].shape == ()


def test_an_object_without_tensors_has_a_structure_and_no_file():
    snap = take_snapshot({"counter": Counter().state_dict()}, StagingArena())
    assert snap.layouts == [] and snap.buffers == []
    assert snap.structure["counter"]["n"] == 3
    assert snap.nonfinite_tensors() == []


def test_collect_state_calls_state_dict_and_adds_ready_made_states():
    states = collect_state({"counter": Counter()}, extra={"rng": {"seed": 1}})
    assert states == {"counter": Counter().state_dict(), "rng": {"seed": 1}}


# ---- the non-finite check --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_found_in_every_float_dtype(dtype: torch.dtype, value: float):
    bad = torch.zeros(5000, dtype=dtype)
    bad[4321] = value
    state = {"fine": torch.ones(10, dtype=dtype), "bad": bad}
    assert take_snapshot({"model": state}, StagingArena()).nonfinite_tensors() == ["model/bad"]


def test_the_check_names_object_and_tensor_of_a_diverged_model_and_its_optimizer():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train_step(model, opt)
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    opt.state_dict()["state"][0]["exp_avg"][0, 0] = float("inf")  # the live optimizer tensor
    bad = take_snapshot(collect_state({"model": model, "optimizer": opt}), StagingArena()).nonfinite_tensors()
    assert sorted(bad) == ["model/2.bias", "optimizer/state.0.exp_avg"]


def test_large_finite_values_whose_sum_overflows_are_not_reported():
    state = {
        "big32": torch.full((4,), 3e38, dtype=torch.float32),  # sum overflows float32
        "big16": torch.full((100_000,), 60000.0, dtype=torch.float16),  # sum overflows float16's range
        "neg": torch.tensor([-3e38, -3e38], dtype=torch.float32),
    }
    assert take_snapshot({"model": state}, StagingArena()).nonfinite_tensors() == []


def test_integer_and_empty_tensors_are_never_reported():
    state = {"steps": torch.tensor([2**62, -(2**62)]), "empty": torch.zeros(0), "flag": torch.ones(2)}
    assert take_snapshot({"model": state}, StagingArena()).nonfinite_tensors() == []


def test_the_list_of_bad_tensors_is_capped_by_limit():
    state = {f"t{i:02d}": torch.full((3,), math.nan) for i in range(30)}
    snap = take_snapshot({"model": state}, StagingArena())
    assert len(snap.nonfinite_tensors()) == 20  # the default limit
    assert len(snap.nonfinite_tensors(limit=5)) == 5
    assert len(snap.nonfinite_tensors(limit=100)) == 30


def test_a_nan_in_a_large_tensor_is_found_after_the_first_slice():
    t = torch.zeros(3 << 20)  # several slices of the element-wise pass
    t[-1] = float("nan")
    assert take_snapshot({"emb": {"weight": t}}, StagingArena()).nonfinite_tensors() == ["emb/weight"]


# ---- registered names ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model", "optimizer", "ema_model", "lr-scheduler", "_private", "A1", "x" * 64])
def test_short_portable_names_are_accepted(name: str):
    check_object_name(name)


@pytest.mark.parametrize(
    "name", ["", "1model", "my model", "a/b", "../evil", "model.v2", "modèle", "x" * 65, "a\x00", "-dash"]
)
def test_names_that_would_make_odd_file_names_are_refused(name: str):
    with pytest.raises(ValueError, match="cannot register") as excinfo:
        check_object_name(name)
    assert repr(name) in str(excinfo.value)


@pytest.mark.parametrize("name", sorted(RESERVED))
def test_names_the_checkpoint_itself_uses_are_refused(name: str):
    with pytest.raises(ValueError, match="not be one of") as excinfo:
        check_object_name(name)
    assert repr(name) in str(excinfo.value)
    assert {"manifest", "state", "rng"} <= RESERVED


# ---- state_sizes and prefaulting ------------------------------------------------------------------------------
def test_state_sizes_gives_the_bytes_of_each_objects_file():
    model = make_model()
    states = collect_state({"model": model, "counter": Counter()})
    sizes = state_sizes(states)
    assert sizes == {"model.safetensors": sum(p.numel() * 4 for p in model.state_dict().values())}
    snap = take_snapshot(states, StagingArena())
    assert sizes == {lay.filename: lay.data_size for lay in snap.layouts}


def test_tied_tensors_are_counted_once():
    shared = torch.randn(1000)
    states = {"model": {"embed": shared, "lm_head": shared, "bias": torch.zeros(10)}}
    assert state_sizes(states) == {"model.safetensors": 4000 + 40}


def test_prefaulted_buffers_are_the_ones_the_first_snapshot_uses():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    train_step(model, opt)
    states = collect_state({"model": model, "optimizer": opt})
    arena = StagingArena()
    arena.prefault(state_sizes(states))
    prefaulted = arena.nbytes
    assert prefaulted >= sum(state_sizes(states).values())
    snap = take_snapshot(states, arena)
    assert arena.nbytes == prefaulted  # no buffer had to be allocated again at the first save
    assert_same_state(restored(snap, "model"), model.state_dict())
