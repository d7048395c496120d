"""Hostile checkpoints, as planted by someone who controls the folder or the bucket (so every digest in the
manifest matches the bytes): a pickle whose ``__reduce__`` creates a marker file in place of model.safetensors;
manifests with ``../`` or absolute paths, claiming a 1 TB file, not JSON at all, or of an unknown format version;
safetensors headers that lie about a shape or about offsets.

Each must be refused with an error (or, when resume looks for the newest checkpoint by itself, a warning) that
says what is wrong; nothing is executed (the marker never appears); nothing is written outside the checkpoint
directory (a listing of the test folder, outside it, is the same before and after); the model is untouched.
Locally through ``resume(path)``, remotely through a fresh session (empty local folder) resuming from the bucket.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from storage_checks import listing

from syncckpt import CheckpointManager, SyncCkptError
from syncckpt.manifest import sha256_hex
from syncckpt.remote import open_remote

NAME = "checkpoint-step-4"


class _Payload:
    """Unpickling this creates ``path``: proof that a loader executed attacker code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _objects():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A real checkpoint folder to start each attack from."""
    d = tmp_path_factory.mktemp("genuine")
    model, opt = _objects()
    with CheckpointManager(d, save_every_n_steps=4, handle_sigterm=False) as mgr:
        mgr.register(model=model, optimizer=opt)
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        mgr.save(4, epoch=0, batch_idx=3)
    return d / NAME


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_bytes())


def _write_manifest(folder: Path, raw: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(raw))


def _vouch(folder: Path, rel: str, data: bytes) -> None:
    """Replace a file and make the manifest vouch for it: the attacker controls both."""
    (folder / rel).write_bytes(data)
    raw = _manifest(folder)
    entry = next(f for f in raw["files"] if f["path"] == rel)
    entry["size"], entry["sha256"] = len(data), sha256_hex(data)
    _write_manifest(folder, raw)


def _safetensors_with(data: bytes, edit) -> bytes:
    """Rewrite a safetensors header with ``edit(header)`` and keep the data section as it was."""
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-(len(h) + 8) % 8)
    return struct.pack("<Q", len(h)) + h + body


def _first_tensor(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__")


def _attack(kind: str, folder: Path, outside: Path) -> tuple[str, ...]:
    """Turn ``folder`` (a copy of a genuine checkpoint) hostile; return words the refusal must contain."""
    if kind == "pickle payload":
        _vouch(folder, "model.safetensors", pickle.dumps(_Payload(outside / "PWNED")))
        return ("model.safetensors",)
    if kind == "../ path":
        raw = _manifest(folder)
        raw["files"][0]["path"] = "../../escape.safetensors"
        _write_manifest(folder, raw)
        return ("../../escape.safetensors",)
    if kind == "absolute path":
        raw = _manifest(folder)
        raw["files"][0]["path"] = str(outside / "abs.safetensors")
        _write_manifest(folder, raw)
        return ("absolute",)
    if kind == "1 TB file":
        raw = _manifest(folder)
        next(f for f in raw["files"] if f["path"] == "model.safetensors")["size"] = 10**12
        _write_manifest(folder, raw)
        return ("1000000000000",)
    if kind == "safetensors shape lie":
        data = (folder / "model.safetensors").read_bytes()
        _vouch(
            folder, "model.safetensors", _safetensors_with(data, lambda h: _first_tensor(h).update(shape=[4096, 4096]))
        )
        return ("model.safetensors",)
    if kind == "safetensors offset lie":
        data = (folder / "model.safetensors").read_bytes()

        def lie(h: dict) -> None:
            t = _first_tensor(h)
            t["data_offsets"] = [t["data_offsets"][0], t["data_offsets"][0] + (1 << 30)]

        _vouch(folder, "model.safetensors", _safetensors_with(data, lie))
        return ("model.safetensors",)
    if kind == "manifest not JSON":
        (folder / "manifest.json").write_bytes(b"\x80\x04\x95 this is not JSON {")
        return ("not valid JSON",)
    if kind == "unknown format version":
        raw = _manifest(folder)
        raw["format_version"] = 99
        _write_manifest(folder, raw)
        return ("format_version 99",)
    raise ValueError(kind)


KINDS = [
    "pickle payload",
    "../ path",
    "absolute path",
    "1 TB file",
    "safetensors shape lie",
    "safetensors offset lie",
    "manifest not JSON",
    "unknown format version",
]
OUTCOMES: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    if OUTCOMES:
        width = max(len(k) for k in KINDS)
        print(f"\n[hostile] {'input':<{width}}  {'local resume(path)':<40} remote (fresh session)")
        for kind in KINDS:
            print(
                f"[hostile] {kind:<{width}}  {OUTCOMES.get((kind, 'local'), 'not run'):<40} "
                f"{OUTCOMES.get((kind, 'remote'), 'not run')}"
            )
        print(
            f"[hostile] refused {sum(v.startswith('refused') for v in OUTCOMES.values())} of {len(OUTCOMES)}; "
            "payloads executed: 0; files written outside the checkpoint directory: 0"
        )


def test_the_pickle_payload_is_armed(tmp_path):
    """The payload used below really creates its marker when unpickled (so 'marker absent' means something)."""
    pickle.loads(pickle.dumps(_Payload(tmp_path / "ARMED"))).close()
    assert (tmp_path / "ARMED").exists()


def _judge(kind: str, where: str, tmp_path: Path, ck: Path, words: tuple[str, ...], resume) -> None:
    model, opt = _objects()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = listing(tmp_path, exclude=ck)
    error: BaseException | None = None
    info = None
    with CheckpointManager(ck, handle_sigterm=False, **resume.get("manager", {})) as mgr:
        mgr.register(model=model, optimizer=opt)
        logger = logging.getLogger("syncckpt")
        records: list[logging.LogRecord] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = records.append  # type: ignore[method-assign]
        logger.addHandler(handler)
        try:
            info = mgr.resume(resume.get("path"))
        except SyncCkptError as e:
            error = e
        finally:
            logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records]
    after = listing(tmp_path, exclude=ck)
    assert not (tmp_path / "PWNED").exists(), f"{kind} ({where}): the pickle payload was executed"
    assert after == before, f"{kind} ({where}): files changed outside {ck}: {set(after) ^ set(before)}"
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items()), (
        f"{kind} ({where}): the model was modified"
    )
    if error is not None:
        outcome = f"refused: {type(error).__name__}"
        message = str(error)
    else:
        assert info is None, f"{kind} ({where}): resumed from a hostile checkpoint: {info}"
        outcome = "refused: skipped with a warning"
        message = " | ".join(warnings)
    OUTCOMES[(kind, where)] = outcome if any(w in message for w in words) else f"UNCLEAR: {message[:80]}"
    print(f"\n[hostile] {kind} ({where}): {outcome}: {message}")
    assert any(w in message for w in words), f"{kind} ({where}): the refusal does not say what is wrong: {message}"


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_checkpoint_refused_locally(kind, tmp_path, genuine):
    ck = tmp_path / "ck"
    folder = ck / NAME
    shutil.copytree(genuine, folder)
    words = _attack(kind, folder, tmp_path)
    _judge(kind, "local", tmp_path, ck, words, {"path": str(folder)})


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_checkpoint_refused_from_the_bucket(kind, tmp_path, genuine, s3_remote_url, s3_storage_options):
    crafted = tmp_path / "attacker" / NAME
    shutil.copytree(genuine, crafted)
    words = _attack(kind, crafted, tmp_path)
    remote = open_remote(s3_remote_url, s3_storage_options)
    for f in sorted(crafted.iterdir()):  # raw objects: the attacker does not go through syncckpt's checks
        remote.write_bytes(f"{NAME}/{f.name}", f.read_bytes())
    remote.close()
    shutil.rmtree(tmp_path / "attacker")
    _judge(
        kind,
        "remote",
        tmp_path,
        tmp_path / "fresh",
        words,
        {"manager": {"remote": s3_remote_url, "storage_options": s3_storage_options}},
    )
