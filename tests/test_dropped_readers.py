"""Retention never rewrites a file in place: a reader that mapped a dropped checkpoint's file (syncckpt's own
read_file, safetensors' load_file, from_pretrained) keeps the bytes it loaded while later saves go on."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from syncckpt import CheckpointManager, local


def test_a_reader_that_mapped_a_dropped_checkpoint_keeps_its_bytes(tmp_path: Path) -> None:
    model = torch.nn.Linear(512, 512)  # 1 MB of weights: read_file and safetensors both map a file this size
    mgr = CheckpointManager(tmp_path, save_every_n_steps=1, keep_last=1, handle_sigterm=False)
    mgr.register(model=model)
    try:
        assert mgr.step(1, epoch=0, batch_idx=1)
        assert mgr.wait()
        saved = model.weight.detach().clone()
        path = tmp_path / "checkpoint-step-1" / "model.safetensors"
        by_safetensors = load_file(str(path))  # views of a mapping of the file
        by_syncckpt = local.read_file(path)  # a copy-on-write mapping
        before = bytes(by_syncckpt)
        for step in range(2, 5):  # step 1 is dropped, later saves write new files
            with torch.no_grad():
                model.weight.add_(1.0)
            assert mgr.step(step, epoch=0, batch_idx=step)
            assert mgr.wait()
        assert not path.exists()
        weight = next(v for k, v in by_safetensors.items() if k.endswith("weight"))
        assert torch.equal(weight, saved), "a dropped checkpoint's bytes changed under a reader"
        assert bytes(by_syncckpt) == before
    finally:
        mgr.close()
