"""State dicts <-> safetensors + JSON: dtypes, optimizer state, odd values, tied weights, hostile files."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from syncckpt import CheckpointManager
from syncckpt.errors import StateNotSerializable, UnsafeCheckpoint
from syncckpt.format import (
    flatten_state,
    iter_file_chunks,
    load_safetensors_bytes,
    plan_layout,
    slot_view,
    unflatten_state,
)


def stage(tensors: list[tuple[str, torch.Tensor]], filename: str = "obj.safetensors", chunk: int = 8 << 20):
    """Lay tensors out and copy them into a staging buffer, as the snapshot does; returns (layout, file bytes)."""
    layout = plan_layout(filename, tensors)
    buf = torch.zeros(max(layout.data_size, 1), dtype=torch.uint8)
    by_name = dict(tensors)
    for slot in layout.slots:
        if slot.nbytes:
            slot_view(buf, slot).copy_(by_name[slot.name])
    return layout, b"".join(bytes(c) for c in iter_file_chunks(layout, buf, chunk))


def through_files(state: Any, prefix: str = "obj") -> Any:
    """flatten -> safetensors bytes + JSON text -> parse -> unflatten: the whole on-disk path, in memory."""
    structure, tensors = flatten_state(state, prefix)
    loaded = load_safetensors_bytes(stage(tensors)[1], where="test") if tensors else {}
    return unflatten_state(json.loads(json.dumps(structure, allow_nan=False)), loaded)


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Deep equality that also checks container types, tensor dtypes/shapes and numpy dtypes."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def st_file(header: dict[str, Any], data: bytes) -> bytes:
    """Hand-made safetensors bytes (header length, JSON header, data) for the hostile-file tests."""
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed.weight


# ---- round trips -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.bool,
        torch.uint8,
        torch.float64,
        torch.int32,
        torch.int8,
    ],
)
def test_model_state_dict_round_trip_keeps_dtype(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    state = {k: (v * 7).to(dtype) if v.is_floating_point() else v.to(dtype) for k, v in model.state_dict().items()}
    back = through_files(state, "model")
    assert_same(state, back)


def test_zero_size_and_scalar_tensors_round_trip():
    state = {"empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5), "long_scalar": torch.tensor(7)}
    assert_same(state, through_files(state))


def test_non_contiguous_tensor_round_trips_as_its_values():
    base = torch.arange(12.0).reshape(3, 4)
    back = through_files({"t": base.t(), "s": base[:, 1]})
    assert torch.equal(back["t"], base.t()) and torch.equal(back["s"], base[:, 1])


def _trained_optimizer(kind: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
        if kind == "adamw"
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_optimizer_state_dict_round_trip(kind):
    model, opt = _trained_optimizer(kind)
    state = opt.state_dict()
    back = through_files(state, "optimizer")
    assert_same(state, back)
    assert all(isinstance(k, int) for k in back["state"])
    if kind == "adamw":
        assert back["param_groups"][0]["betas"] == (0.8, 0.95)
        step = back["state"][0]["step"]
        assert isinstance(step, torch.Tensor) and step.dim() == 0 and step.item() == 3
    else:
        assert "momentum_buffer" in back["state"][0]
    # and it loads into a fresh optimizer, which then steps exactly like the original
    model2 = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model2.load_state_dict(model.state_dict())
    opt2 = type(opt)(model2.parameters(), lr=0.5)
    opt2.load_state_dict(back)
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        m(x).pow(2).mean().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_nested_python_values_round_trip():
    state = {
        "list": [1, "two", None, [3.5, (4, 5)], {"k": b"\x00\xff"}],
        "tuple": (None, True, False, -0.0),
        "inf": float("inf"),
        "ninf": float("-inf"),
        "nan": float("nan"),
        "bytes": bytes(range(256)),
        "int_keys": {1: "a", 2: {3: (6, 7)}},
        "mixed_keys": {"a": 1, 2: "b", None: 3, (1, "x"): 4, 1.5: 5, True: 6},
        "marker_lookalike": {"__tensor__": "not a tensor"},
        "tuple_lookalike": {"__tuple__": [1, 2]},
        "big": 2**62,
        "tensors_in_lists": [torch.ones(2), (torch.zeros(1, dtype=torch.int64),)],
        "empty": {},
        "empty_list": [],
        "empty_tuple": (),
    }
    assert_same(state, through_files(state))


def test_numpy_arrays_and_scalars_round_trip():
    state = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "f16": np.linspace(0, 1, 5).astype(np.float16),
        "i64": np.array([-1, 2**40], dtype=np.int64),
        "bool": np.array([True, False]),
        "u8": np.arange(4, dtype=np.uint8),
        "transposed": np.arange(6, dtype=np.float64).reshape(2, 3).T,
    }
    back = through_files(state)
    for k, v in state.items():
        assert isinstance(back[k], np.ndarray), k
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k
    scalars = through_files({"f": np.float32(1.5), "i": np.int64(7), "b": np.bool_(True), "d": np.float64("inf")})
    assert scalars == {"f": 1.5, "i": 7, "b": True, "d": float("inf")}


def test_zero_dim_numpy_array_keeps_its_shape():
    # np.ascontiguousarray returns at least 1-d arrays, so a 0-d array must not pass through it unreshaped.
    back = through_files({"zero_dim": np.array(3.0), "zero_dim_i": np.array(7, dtype=np.int32)})
    assert back["zero_dim"].shape == () and back["zero_dim"] == 3.0
    assert back["zero_dim_i"].shape == () and back["zero_dim_i"].dtype == np.int32


# ---- tied weights ----------------------------------------------------------------------------------------------


def test_tied_weights_are_stored_once_and_come_back_shared():
    state = Tied().state_dict()
    structure, tensors = flatten_state(state, "model")
    names = [n for n, _ in tensors]
    assert names == ["embed.weight", "body.weight", "body.bias"]
    assert structure["lm_head.weight"] == structure["embed.weight"] == {"__tensor__": "embed.weight"}
    back = through_files(state, "model")
    assert back["lm_head.weight"] is back["embed.weight"]


def test_tied_weights_survive_save_and_resume(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    with torch.no_grad():
        model.embed.weight.mul_(3)
    with CheckpointManager(tmp_path, save_every_n_steps=1, handle_sigterm=False) as mgr:
        mgr.register(model=model)
        assert mgr.step(1)
        assert mgr.wait(30)
    on_disk = safetensors.torch.load_file(tmp_path / "checkpoint-step-1" / "model.safetensors")
    assert sorted(on_disk) == ["body.bias", "body.weight", "embed.weight"]

    torch.manual_seed(1)
    fresh = Tied()
    with CheckpointManager(tmp_path, handle_sigterm=False) as mgr:
        mgr.register(model=fresh)
        assert mgr.resume().global_step == 1
    assert fresh.lm_head.weight is fresh.embed.weight
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    with torch.no_grad():
        fresh.embed.weight[0, 0] = 123.0
    assert fresh.lm_head.weight[0, 0].item() == 123.0


def test_views_of_one_storage_that_differ_are_both_stored():
    base = torch.arange(8.0)
    _, tensors = flatten_state({"a": base[:4], "b": base[4:], "c": base[:4]}, "x")
    assert [n for n, _ in tensors] == ["a", "b"]


# ---- not serialisable ------------------------------------------------------------------------------------------


def test_lambda_raises_naming_the_key_path():
    with pytest.raises(StateNotSerializable, match=r"'custom\.hooks\.1\.fn'.*function"):
        flatten_state({"hooks": [0, {"fn": lambda: 0}]}, "custom")


def test_object_in_optimizer_param_groups_raises_naming_the_key_path():
    _, opt = _trained_optimizer("sgd")
    opt.param_groups[0]["schedule"] = object()
    with pytest.raises(StateNotSerializable, match=r"'optimizer\.param_groups\.0\.schedule'.*builtins\.object"):
        flatten_state(opt.state_dict(), "optimizer")


@pytest.mark.parametrize(
    "value,what",
    [
        ({1, 2}, "set"),
        (torch.zeros(2, dtype=torch.complex64), "complex64"),
        (torch.zeros(3).to_sparse(), "sparse"),
        ({object(): 1}, "dict key"),
        (Path("x"), "Path"),
        (np.array(["a"], dtype=object), "object"),
    ],
)
def test_other_non_serialisable_values_raise(value, what):
    with pytest.raises(StateNotSerializable) as info:
        flatten_state({"inner": {"bad": value}}, "obj")
    assert "'obj.inner" in str(info.value) and what in str(info.value)


def test_state_not_serializable_is_a_type_error():
    with pytest.raises(TypeError):
        flatten_state({"x": lambda: 0}, "obj")


# ---- the safetensors bytes ---------------------------------------------------------------------------------------


def test_planned_bytes_load_with_the_safetensors_library_identically():
    torch.manual_seed(0)
    tensors = [
        ("a.f16", torch.randn(3, 5).half()),
        ("b.i64", torch.arange(7)),
        ("c.bool", torch.tensor([True, False])),
        ("d.f64", torch.randn(2, dtype=torch.float64)),
        ("e.bf16", torch.randn(4).bfloat16()),
        ("f.u8", torch.arange(3, dtype=torch.uint8)),
        ("g.f32", torch.randn(1)),
    ]
    layout, data = stage(tensors)
    assert layout.file_size == len(data)
    assert len(layout.header) % 8 == 0  # the data section starts 8-byte aligned
    for slot in layout.slots:
        assert slot.offset % torch.empty(0, dtype=slot.dtype).element_size() == 0, slot
    loaded = safetensors.torch.load(data)
    assert sorted(loaded) == sorted(n for n, _ in tensors)
    for name, t in tensors:
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    _, small_chunks = stage(tensors, chunk=7)
    assert small_chunks == data
    ours = load_safetensors_bytes(data, where="x")
    assert_same(dict(sorted(ours.items())), dict(sorted(loaded.items())))


def test_committed_model_file_is_a_plain_safetensors_state_dict(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with CheckpointManager(tmp_path, save_every_n_steps=5, handle_sigterm=False) as mgr:
        mgr.register(model=model, optimizer=torch.optim.AdamW(model.parameters()))
        mgr.save(5)
        assert mgr.wait(30)
    loaded = safetensors.torch.load_file(tmp_path / "checkpoint-step-5" / "model.safetensors")
    assert_same(dict(sorted(loaded.items())), dict(sorted(model.state_dict().items())))


def _good_header() -> dict[str, Any]:
    return {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(st_file(_good_header(), b"\x00" * 8), id="shorter-data"),
        pytest.param(
            st_file(
                {
                    "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
                },
                b"\x00" * 16,
            ),
            id="overlapping-offsets",
        ),
        pytest.param(
            st_file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\x00" * 16),
            id="shape-times-dtype-not-span",
        ),
        pytest.param(
            st_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, b"\x00" * 16), id="reversed-offsets"
        ),
        pytest.param(
            st_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 2**70]}}, b"\x00" * 16), id="huge-offset"
        ),
        pytest.param(
            st_file({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, b"\x00" * 16),
            id="overflowing-shape",
        ),
        pytest.param(
            st_file(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]},
                },
                b"\x00" * 16,
            ),
            id="gap-between-tensors",
        ),
        pytest.param(st_file(_good_header(), b"\x00" * 24), id="bytes-after-the-last-tensor"),
        pytest.param(
            st_file({"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, b"\x00" * 16), id="float-shape"
        ),
        pytest.param(st_file({"a": {"dtype": "F32", "shape": [4]}}, b"\x00" * 16), id="no-offsets"),
    ],
)
def test_lying_headers_are_unsafe(data):
    with pytest.raises(UnsafeCheckpoint, match="run/model.safetensors"):
        load_safetensors_bytes(data, where="run/model.safetensors")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x80\x04", id="too-short"),
        pytest.param(b"\x80\x04\x95" + b"\x00" * 64, id="pickle"),
        pytest.param(b"PK\x03\x04" + b"\x00" * 100, id="zip"),
        pytest.param(struct.pack("<Q", 10) + b"not json!!" + b"\x00" * 8, id="header-not-json"),
        pytest.param(struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", id="header-not-utf8"),
        pytest.param(st_file({"a": "F32"}, b""), id="entry-not-an-object"),
        pytest.param(st_file([1, 2], b""), id="header-is-a-list"),  # type: ignore[arg-type]
        pytest.param(st_file(5, b""), id="header-is-a-number"),  # type: ignore[arg-type]
    ],
)
def test_non_safetensors_files_are_unsafe(data):
    with pytest.raises(UnsafeCheckpoint, match="run/x.safetensors"):
        load_safetensors_bytes(data, where="run/x.safetensors")


@pytest.mark.parametrize("code", ["F128", "C64", "OBJ", None])
def test_unknown_dtype_is_unsafe(code):
    data = st_file({"a": {"dtype": code, "shape": [1], "data_offsets": [0, 8]}}, b"\x00" * 8)
    with pytest.raises(UnsafeCheckpoint, match=rf"tensor 'a' has unsupported dtype {code!r}"):
        load_safetensors_bytes(data, where="x")


def test_tensors_are_views_of_a_writable_buffer_and_a_mapped_file_is_never_written(tmp_path):
    """The reader's zero-copy path: no tensor is copied out of the verified buffer, and a tensor file read by
    local.read_file (mapped copy-on-write when large) stays as it was when a loaded tensor is written to."""
    from syncckpt import local

    w = torch.arange(1 << 19, dtype=torch.float32)  # 2 MiB: over local.MAP_AT_BYTES, so the file is mapped
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors.torch.save({"w": w, "b": torch.ones(3, dtype=torch.bfloat16)}))
    data = local.read_file(path)
    assert not isinstance(data, (bytes, bytearray))  # a mapping
    loaded = load_safetensors_bytes(data, where="model.safetensors")
    assert torch.equal(loaded["w"], w) and loaded["b"].dtype == torch.bfloat16
    offset = loaded["w"].data_ptr() - torch.frombuffer(memoryview(data), dtype=torch.uint8).data_ptr()
    assert 0 < offset < len(data)  # the tensor's memory is the mapping's: a view, not a copy
    loaded["w"].add_(1.0)  # an optimizer updating state loaded as views
    assert torch.equal(safetensors.torch.load_file(str(path))["w"], w)  # the file is untouched
    small = bytearray(safetensors.torch.save({"s": torch.tensor([1.0, 2.0])}))
    out = load_safetensors_bytes(small, where="small")["s"]
    out.mul_(10)
    assert bytes(small[-8:]) == struct.pack("<2f", 10.0, 20.0)  # a view of the bytearray, not a copy


def test_a_tensor_another_writer_left_unaligned_is_copied_and_loads_right():
    header = {
        "flag": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
    }
    data = st_file(header, b"\x07" + struct.pack("<2f", 1.5, -2.0))
    loaded = load_safetensors_bytes(data, where="foreign.safetensors")
    assert loaded["flag"].tolist() == [7] and loaded["w"].tolist() == [1.5, -2.0]
