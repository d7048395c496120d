"""Corruption of the newest checkpoint, locally and in the bucket: a flipped byte, a truncated file, a missing file,
an edited manifest, and (remote only: local folders have no LATEST) a LATEST pointing at a missing checkpoint or at
the wrong one. Every kind must be detected: resume never loads the damaged checkpoint, falls back to the previous
one (or, for LATEST, to what the listing shows) and logs a warning on the ``syncckpt`` logger naming the checkpoint
and the problem. The restored weights are compared with the ones saved, tensor by tensor.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from syncckpt import CheckpointManager
from syncckpt.manifest import Latest, sha256_hex
from syncckpt.remote import open_remote

NEWEST, PREVIOUS = "checkpoint-step-4", "checkpoint-step-2"

# kind -> (words one of which the warning must contain, applies locally)
KINDS = {
    "flipped byte": (("SHA-256 mismatch",), True),
    "truncated file": (("truncated", "manifest says"), True),
    "missing file": (("missing", "no such object", "not found"), True),
    "edited manifest": (("SHA-256 mismatch", "size"), True),
    "LATEST -> missing checkpoint": (("LATEST points at checkpoint-step-99",), False),
    "LATEST -> wrong checkpoint": (("LATEST does not match",), False),
}


def _objects():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train_and_save(directory: Path, remote: str | None, options) -> dict[int, dict[str, torch.Tensor]]:
    """Save steps 2 and 4 (locally, and mirrored when ``remote``); return the model weights at each."""
    model, opt = _objects()
    saved = {}
    with CheckpointManager(
        directory, save_every_n_steps=2, keep_last=5, remote=remote, storage_options=options, handle_sigterm=False
    ) as mgr:
        mgr.register(model=model, optimizer=opt)
        for step in range(1, 5):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if mgr.step(step):
                saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
        assert mgr.wait(timeout=120)
    return saved


def _flip(data: bytes) -> bytes:
    i = len(data) - 5  # inside the tensor data, not the header
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


def _corrupt_local(folder: Path, kind: str) -> None:
    model = folder / "model.safetensors"
    if kind == "flipped byte":
        model.write_bytes(_flip(model.read_bytes()))
    elif kind == "truncated file":
        model.write_bytes(model.read_bytes()[:-7])
    elif kind == "missing file":
        (folder / "optimizer.safetensors").unlink()
    elif kind == "edited manifest":
        raw = json.loads((folder / "manifest.json").read_bytes())
        entry = next(f for f in raw["files"] if f["path"] == "model.safetensors")
        entry["sha256"] = sha256_hex(b"something else")
        (folder / "manifest.json").write_text(json.dumps(raw))
    else:
        raise ValueError(kind)


def _corrupt_remote(remote, kind: str) -> None:
    model = f"{NEWEST}/model.safetensors"
    if kind == "flipped byte":
        remote.write_bytes(model, _flip(remote.read_bytes(model, max_size=1 << 30)))
    elif kind == "truncated file":
        remote.write_bytes(model, remote.read_bytes(model, max_size=1 << 30)[:-7])
    elif kind == "missing file":
        remote.delete(f"{NEWEST}/optimizer.safetensors")
    elif kind == "edited manifest":
        raw = json.loads(remote.read_bytes(f"{NEWEST}/manifest.json"))
        entry = next(f for f in raw["files"] if f["path"] == "model.safetensors")
        entry["sha256"] = sha256_hex(b"something else")
        remote.write_bytes(f"{NEWEST}/manifest.json", json.dumps(raw).encode())
    elif kind == "LATEST -> missing checkpoint":
        remote.write_bytes("LATEST", Latest("checkpoint-step-99", 99, "0" * 64).to_bytes())
    elif kind == "LATEST -> wrong checkpoint":
        # Names the previous checkpoint while carrying the newest one's step and manifest digest.
        newest_manifest = remote.read_bytes(f"{NEWEST}/manifest.json")
        remote.write_bytes("LATEST", Latest(PREVIOUS, 4, sha256_hex(newest_manifest)).to_bytes())
    else:
        raise ValueError(kind)


def _resume(directory: Path, remote: str | None, options, caplog) -> tuple[object, dict, list[str]]:
    model, opt = _objects()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="syncckpt"):
        with CheckpointManager(directory, remote=remote, storage_options=options, handle_sigterm=False) as mgr:
            mgr.register(model=model, optimizer=opt)
            info = mgr.resume()
    warnings = [
        r.getMessage() for r in caplog.records if r.name.startswith("syncckpt") and r.levelno >= logging.WARNING
    ]
    return info, model.state_dict(), warnings


def _verdict(kind: str, info, state, warnings, saved, location: str) -> str:
    words, _ = KINDS[kind]
    latest_kind = kind.startswith("LATEST")
    want_step = 4 if latest_kind else 2
    if info is None or info.global_step != want_step:
        return f"NOT detected: resumed from {getattr(info, 'name', None)}"
    if any(not torch.equal(state[k], saved[want_step][k]) for k in state):
        return "NOT detected: restored weights differ from the ones saved"
    named = [w for w in warnings if any(x in w for x in words) and (latest_kind or NEWEST in w)]
    if not named:
        return f"NOT reported: warnings were {warnings}"
    return "detected"


@pytest.fixture(scope="module")
def results():
    table: dict[tuple[str, str], str] = {}
    yield table
    width = max(len(k) for k in KINDS)
    print(f"\n[corruption] {'kind x location':<{width}}  {'local':<12} remote")
    for kind, (_, local_too) in KINDS.items():
        loc = table.get((kind, "local"), "n/a" if not local_too else "not run")
        rem = table.get((kind, "remote"), "not run")
        print(f"[corruption] {kind:<{width}}  {loc.split(':')[0]:<12} {rem.split(':')[0]}")
    done = [v for v in table.values()]
    print(
        f"[corruption] detected {sum(v == 'detected' for v in done)} of {len(done)} (n/a: local folders have no "
        "LATEST pointer)"
    )


@pytest.mark.parametrize("kind", [k for k, (_, local_too) in KINDS.items() if local_too])
def test_local_corruption_is_detected_and_resume_falls_back(kind, tmp_path, caplog, results):
    saved = _train_and_save(tmp_path / "ck", None, None)
    _corrupt_local(tmp_path / "ck" / NEWEST, kind)
    try:
        info, state, warnings = _resume(tmp_path / "ck", None, None, caplog)
        verdict = _verdict(kind, info, state, warnings, saved, "local")
    except Exception as e:  # noqa: BLE001 - a crash is a verdict too: resume did not fall back
        verdict = f"NOT handled: resume raised {type(e).__name__}: {e}"
    results[(kind, "local")] = verdict
    print(f"\n[corruption] {kind} (local): {verdict}; warnings: {warnings if verdict == 'detected' else '-'}")
    assert verdict == "detected", verdict


@pytest.mark.parametrize("kind", list(KINDS))
def test_remote_corruption_is_detected_and_resume_falls_back(
    kind, tmp_path, caplog, s3_remote_url, s3_storage_options, results
):
    saved = _train_and_save(tmp_path / "writer", s3_remote_url, s3_storage_options)
    remote = open_remote(s3_remote_url, s3_storage_options)
    _corrupt_remote(remote, kind)
    remote.close()
    warnings: list[str] = []
    try:
        # A fresh session on another machine: nothing local, everything comes from the bucket.
        info, state, warnings = _resume(tmp_path / "fresh", s3_remote_url, s3_storage_options, caplog)
        verdict = _verdict(kind, info, state, warnings, saved, "remote")
    except Exception as e:  # noqa: BLE001 - a crash is a verdict too: resume did not fall back
        verdict = f"NOT handled: resume raised {type(e).__name__}: {e}"
    results[(kind, "remote")] = verdict
    print(f"\n[corruption] {kind} (remote): {verdict}; warnings: {warnings if verdict == 'detected' else '-'}")
    shutil.rmtree(tmp_path / "fresh", ignore_errors=True)
    assert verdict == "detected", verdict
