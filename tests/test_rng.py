"""RNG states as plain data: capture, a trip through JSON (and the checkpoint format), restore, identical draws.

CUDA generators cannot run on a CPU-only machine; the CUDA entry is only checked for being left alone where it
cannot be applied.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from syncckpt import rng
from syncckpt.format import flatten_state, unflatten_state


def draws() -> dict[str, Any]:
    """One draw from every generator a training step may use, including the cached-Gaussian paths."""
    return {
        "python": [random.random(), random.getrandbits(64), random.gauss(0, 1)],
        "numpy": [np.random.rand(3).tolist(), np.random.randint(0, 2**31, 4).tolist(), float(np.random.randn())],
        "torch": [torch.rand(3).tolist(), torch.randint(0, 2**31, (4,)).tolist(), torch.randn(2).tolist()],
    }


def through_json(state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint gives back: tensors through safetensors, everything else through JSON."""
    structure, tensors = flatten_state(state, "rng")
    stored = safetensors.torch.load(safetensors.torch.save(dict(tensors)))
    return unflatten_state(json.loads(json.dumps(structure, allow_nan=False)), stored)


@pytest.fixture(autouse=True)
def keep_global_rng_states():
    """These tests move the process-wide generators; put them back for the tests that run after."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def test_restore_replays_every_generator_exactly():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draws()  # move off the seeded start
    state = rng.capture()
    expected = draws()
    draws()  # the generators move on
    rng.restore(state)
    assert draws() == expected


def test_a_captured_state_survives_json_and_the_checkpoint_format():
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    random.gauss(0, 1), np.random.randn()  # an odd number of Gaussian draws leaves a cached value in both
    state = rng.capture()
    expected = draws()
    rng.restore(through_json(state))
    assert draws() == expected


def test_a_state_whose_tuples_came_back_from_json_as_lists_restores_exactly():
    random.seed(21), np.random.seed(22), torch.manual_seed(23)
    random.gauss(0, 1), np.random.randn()
    state = rng.capture()
    expected = draws()
    plain = json.loads(json.dumps({k: v for k, v in state.items() if k != "torch"}, allow_nan=False))
    assert isinstance(plain["python"], list)  # JSON has no tuples
    rng.restore({**plain, "torch": state["torch"].clone()})
    assert draws() == expected


def test_everything_but_the_torch_state_is_plain_json_data():
    state = rng.capture()
    plain = {k: v for k, v in state.items() if k not in ("torch", "cuda")}
    json.dumps(plain, allow_nan=False)  # no numpy scalars, arrays or tuples that JSON cannot hold
    assert isinstance(state["torch"], torch.Tensor) and state["torch"].dtype == torch.uint8
    assert state["numpy"]["kind"] == "MT19937" and len(state["numpy"]["keys"]) == 624


def test_the_captured_state_is_a_copy_that_later_draws_do_not_change():
    state = rng.capture()
    frozen = json.dumps({k: v for k, v in state.items() if k != "torch"}), state["torch"].clone()
    draws()
    assert json.dumps({k: v for k, v in state.items() if k != "torch"}) == frozen[0]
    assert torch.equal(state["torch"], frozen[1])


def test_restore_puts_back_only_the_generators_in_the_state():
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    state = rng.capture()
    py_expected = random.random()
    np_next, torch_next = np.random.get_state(), torch.get_rng_state()
    rng.restore({"python": through_json(state)["python"]})
    assert random.random() == py_expected
    assert np.array_equal(np.random.get_state()[1], np_next[1])  # numpy and torch were not touched
    assert torch.equal(torch.get_rng_state(), torch_next)


def test_a_torch_state_stored_with_another_integer_dtype_is_accepted():
    state = rng.capture()
    expected = torch.rand(4)
    rng.restore({"torch": state["torch"].to(torch.int64)})
    assert torch.equal(torch.rand(4), expected)


def test_a_cuda_state_that_cannot_be_applied_is_left_alone():
    state = rng.capture()
    expected = draws()
    # One generator more than this machine has (none without CUDA): nothing to apply it to, and no error.
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * (count + 1)
    rng.restore(state)
    assert draws() == expected
