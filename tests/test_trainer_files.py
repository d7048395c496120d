"""PicklefreeTrainer: the transformers Trainer's own checkpoint files without pickle, with the real Trainer.

The bit-exact kill-and-resume from a bucket with pickle and torch.load poisoned is in
``tests/e2e/test_trainer_signals.py``; these are the refusals and the gradient scaler, which the CPU Trainer does
not create (``fp16=True`` on CPU trains without one), so the test hands it a real ``torch.amp.GradScaler``.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent / "e2e"))
import torch  # noqa: E402
from hf_trainer_job import build_trainer  # noqa: E402

from syncckpt.errors import UnsafeCheckpoint  # noqa: E402
from syncckpt.format import decode_object_file  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """The runs are tiny: two intra-op threads on two shared cores run them slower than one."""


def _refuse(*a, **k):
    raise AssertionError("a pickle was opened")


def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, _refuse)


def test_a_checkpoint_of_the_plain_trainer_is_refused_naming_its_pickle_and_nothing_is_unpickled(tmp_path, monkeypatch):
    build_trainer(str(tmp_path / "plain"), [], max_steps=2, save_steps=2).train()
    checkpoint = tmp_path / "plain" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file()  # the plain Trainer's torch.save pickle
    trainer = build_trainer(str(tmp_path / "out"), [], max_steps=4, save_steps=2, picklefree=True)
    _poison(monkeypatch)
    with pytest.raises(UnsafeCheckpoint, match=r"optimizer\.pt: a pickle written by the plain transformers Trainer"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_an_output_dir_holding_plain_trainer_checkpoints_is_refused_before_training(tmp_path):
    """Training from scratch into it used to write the new checkpoint-N folders over the old ones, leaving their
    pickles beside the new files, listed in the manifest and mirrored."""
    build_trainer(str(tmp_path / "out"), [], max_steps=2, save_steps=2).train()  # a plain Trainer run
    before = sorted(p.name for p in (tmp_path / "out" / "checkpoint-2").iterdir())
    trainer = build_trainer(str(tmp_path / "out"), [], max_steps=2, save_steps=2, picklefree=True)
    with pytest.raises(UnsafeCheckpoint, match=r"holds checkpoints of the plain transformers Trainer"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoint-2").iterdir()) == before  # untouched


def test_picklefree_checkpoints_hold_no_pickle_and_the_gradient_scaler_round_trips(tmp_path, monkeypatch):
    out = tmp_path / "out"
    trainer = build_trainer(str(out), [], max_steps=2, save_steps=2, picklefree=True)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=7)
    trainer.train()
    checkpoint = out / "checkpoint-2"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin"))], names
    assert {"optimizer.safetensors", "scheduler.safetensors", "scaler.safetensors", "rng_state.safetensors"} <= set(
        names
    )
    assert "training_args.json" in names
    scaler_state = decode_object_file((checkpoint / "scaler.safetensors").read_bytes(), where="scaler")
    assert scaler_state == trainer.accelerator.scaler.state_dict()

    resumed = build_trainer(str(tmp_path / "again"), [], max_steps=2, save_steps=2, picklefree=True)
    resumed.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=99)
    _poison(monkeypatch)
    resumed._load_scaler(str(checkpoint))
    resumed.create_optimizer_and_scheduler(num_training_steps=2)
    resumed._load_optimizer_and_scheduler(str(checkpoint))
    assert resumed.accelerator.scaler.state_dict() == scaler_state
    a, b = trainer.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])
