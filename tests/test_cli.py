"""The ``syncckpt`` command, run in-process through ``main([...])`` and as the installed console script.

Checkpoints are written by the real CheckpointManager; remotes are ``file://`` folders under tmp_path, plus S3
(moto) for one round trip that also checks no credential reaches the output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from syncckpt import CheckpointManager, quarantine
from syncckpt.cli import main
from syncckpt.lease import Lease
from syncckpt.manifest import Manifest
from syncckpt.remote import open_remote


# ---- helpers ------------------------------------------------------------------------------------------------------
def make_run(
    directory: Path, steps: tuple[int, ...] = (1, 2, 3), keep_last: int = 3, **options: Any
) -> torch.nn.Module:
    """Train a tiny model for a few steps, saving a step checkpoint after each; returns the trained model."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with CheckpointManager(
        directory, save_every_n_steps=1, keep_last=keep_last, handle_sigterm=False, **options
    ) as mgr:
        mgr.register(model=model, optimizer=opt)
        for step in steps:
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            mgr.save(step, epoch=0, batch_idx=step - 1)
            if options.get("remote"):
                assert mgr.wait()  # mirror each one: the uploader would skip a step checkpoint superseded in its queue
        assert mgr.wait()
    return model


def make_trainer_folder(parent: Path, step: int = 7, epoch: float = 1.5) -> Path:
    """A transformers Trainer style checkpoint-N folder (no manifest)."""
    folder = parent / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(2000))
    (folder / "config.json").write_text('{"hidden_size": 4}')
    (folder / "trainer_state.json").write_text(json.dumps({"epoch": epoch, "global_step": step}))
    return folder


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, _ = cli(capsys, "--json", *argv)
    return code, json.loads(out)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def resume_step(directory: Path, expect: torch.nn.Module | None = None) -> int:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with CheckpointManager(directory, save_every_n_steps=None, handle_sigterm=False) as mgr:
        mgr.register(model=model, optimizer=opt)
        info = mgr.resume()
    assert info is not None
    if expect is not None:
        for a, b in zip(model.state_dict().values(), expect.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    return info.global_step


def remote_names(url: str, options: dict[str, Any] | None = None) -> list[str]:
    r = open_remote(url, options)
    try:
        return sorted(r.list_checkpoints())
    finally:
        r.close()


@pytest.fixture
def run(tmp_path: Path) -> Path:
    directory = tmp_path / "ckpts"
    make_run(directory)
    return directory


@pytest.fixture
def remote_url(tmp_path: Path) -> str:
    return f"file://{tmp_path}/remote/run"


def syncckpt_script() -> str:
    path = shutil.which("syncckpt") or str(Path(sys.executable).parent / "syncckpt")
    assert Path(path).exists(), "the syncckpt console script is not installed (pip install -e .)"
    return path


# ---- the console script ---------------------------------------------------------------------------------------------
def test_console_script_help_and_ls(run: Path) -> None:
    script = syncckpt_script()
    helped = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    for command in ("ls", "verify", "pull", "push", "prune", "watch"):
        assert command in helped.stdout
    listed = subprocess.run([script, "ls", str(run)], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["checkpoint", "kind", "step", "epoch", "size", "created", "healthy", "mirrored"]
    assert [line.split()[0] for line in lines[1:]] == ["checkpoint-step-3", "checkpoint-step-2", "checkpoint-step-1"]


def test_python_dash_m_syncckpt_is_the_same_command(run: Path) -> None:
    """A notebook kernel or an unpacked archive may not have the console script on PATH."""
    script = subprocess.run([syncckpt_script(), "ls", str(run)], capture_output=True, text=True, timeout=120)
    module = subprocess.run(
        [sys.executable, "-m", "syncckpt", "ls", str(run)], capture_output=True, text=True, timeout=120
    )
    assert module.returncode == 0, module.stderr
    assert module.stdout == script.stdout


# ---- ls -------------------------------------------------------------------------------------------------------------
def test_ls_local_newest_first(capsys: pytest.CaptureFixture[str], run: Path) -> None:
    code, out, err = cli(capsys, "ls", str(run))
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["checkpoint-step-3", "checkpoint-step-2", "checkpoint-step-1"]
    assert rows[0][1:4] == ["step", "3", "0"]
    assert rows[0][-2:] == ["yes", "-"]  # healthy; mirrored unknown without --remote


def test_ls_json_and_flag_position(capsys: pytest.CaptureFixture[str], run: Path) -> None:
    code, data = cli_json(capsys, "ls", str(run))
    assert code == 0
    assert [c["name"] for c in data["checkpoints"]] == ["checkpoint-step-3", "checkpoint-step-2", "checkpoint-step-1"]
    first = data["checkpoints"][0]
    assert first["global_step"] == 3 and first["healthy"] is True and first["mirrored"] is None and first["size"] > 0
    code, out, _ = cli(capsys, "ls", str(run), "--json")  # global flags work after the subcommand too
    assert code == 0 and json.loads(out) == data


def test_ls_remote_flag_needs_a_local_folder(capsys: pytest.CaptureFixture[str], remote_url: str) -> None:
    assert cli(capsys, "ls", remote_url, "--remote", remote_url)[0] == 2


def test_ls_single_checkpoint_folder(capsys: pytest.CaptureFixture[str], run: Path) -> None:
    code, data = cli_json(capsys, "ls", str(run / "checkpoint-step-2"))
    assert code == 0 and [c["name"] for c in data["checkpoints"]] == ["checkpoint-step-2"]


def test_push_run_then_ls_remote_and_mirrored(capsys: pytest.CaptureFixture[str], run: Path, remote_url: str) -> None:
    code, out, err = cli(capsys, "push", str(run), remote_url)
    assert code == 0, err
    assert out.count("pushed") == 3
    r = open_remote(remote_url)
    assert r.read_latest().name == "checkpoint-step-3"
    r.close()

    code, data = cli_json(capsys, "ls", remote_url)
    assert code == 0
    assert [c["name"] for c in data["checkpoints"]] == ["checkpoint-step-3", "checkpoint-step-2", "checkpoint-step-1"]
    assert all(c["mirrored"] is True for c in data["checkpoints"])
    code, out, _ = cli(capsys, "ls", remote_url)
    assert code == 0 and out.splitlines()[1].split()[-1] == "yes"

    # A local copy that differs from the remote one is not "mirrored".
    local_only = make_run(run.parent / "other", steps=(3, 4))
    assert local_only is not None
    code, data = cli_json(capsys, "ls", str(run.parent / "other"), "--remote", remote_url)
    mirrored = {c["name"]: c["mirrored"] for c in data["checkpoints"]}
    assert code == 0 and mirrored == {"checkpoint-step-4": False, "checkpoint-step-3": False}
    code, data = cli_json(capsys, "ls", str(run), "--remote", remote_url)
    assert code == 0 and all(c["mirrored"] is True for c in data["checkpoints"])

    # Pushing again uploads nothing.
    code, data = cli_json(capsys, "push", str(run), remote_url)
    assert code == 0 and data["pushed"] == [] and len(data["skipped"]) == 3


def test_incremental_run_compares_by_content_and_prune_collects_blobs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, remote_url: str
) -> None:
    run = tmp_path / "ckpts"
    make_run(run, remote=remote_url, incremental=True)  # the remote stores content-addressed blobs
    code, data = cli_json(capsys, "ls", str(run), "--remote", remote_url)
    assert code == 0 and [c["mirrored"] for c in data["checkpoints"]] == [True, True, True]
    code, data = cli_json(capsys, "push", str(run), remote_url)
    assert code == 0 and data["pushed"] == [] and len(data["skipped"]) == 3
    assert cli(capsys, "verify", remote_url)[0] == 0
    dest = tmp_path / "dest"
    assert cli_json(capsys, "pull", remote_url, str(dest))[1]["downloaded"] is True
    assert cli_json(capsys, "pull", remote_url, str(dest))[1]["downloaded"] is False

    r = open_remote(remote_url)
    before = set(r.list_blobs())
    code, data = cli_json(capsys, "prune", remote_url, "--keep-last", "1")
    assert code == 0 and data["deleted"] == ["checkpoint-step-1", "checkpoint-step-2"]
    kept, _ = r.read_manifest("checkpoint-step-3")
    referenced = {d for f in kept.files for _, d in f.parts or ()}
    after = set(r.list_blobs())
    r.close()
    assert referenced and after == referenced and after < before
    assert cli(capsys, "verify", remote_url)[0] == 0
    assert cli(capsys, "verify", remote_url.removeprefix("file://"))[0] == 0  # the same mirror as a plain path


# ---- verify ---------------------------------------------------------------------------------------------------------
def test_verify_ok(capsys: pytest.CaptureFixture[str], run: Path, remote_url: str) -> None:
    code, out, err = cli(capsys, "verify", str(run))
    assert code == 0, err
    assert "all 3 valid" in out
    assert cli(capsys, "verify", str(run / "checkpoint-step-1"))[0] == 0
    assert cli(capsys, "push", str(run), remote_url)[0] == 0
    code, data = cli_json(capsys, "verify", remote_url)
    assert code == 0 and data["valid"] is True and len(data["checkpoints"]) == 3
    assert cli(capsys, "verify", f"{remote_url}/checkpoint-step-2")[0] == 0


def test_verify_flipped_byte_names_the_file(capsys: pytest.CaptureFixture[str], run: Path, remote_url: str) -> None:
    assert cli(capsys, "push", str(run), remote_url)[0] == 0
    flip_byte(run / "checkpoint-step-2" / "model.safetensors")
    code, out, _ = cli(capsys, "verify", str(run))
    assert code == 1
    bad = [line for line in out.splitlines() if line.startswith("INVALID")]
    assert len(bad) == 1 and "checkpoint-step-2" in bad[0] and "model.safetensors" in bad[0] and "SHA-256" in bad[0]
    assert cli(capsys, "verify", str(run / "checkpoint-step-3"))[0] == 0

    remote_root = Path(remote_url.removeprefix("file://"))
    flip_byte(remote_root / "checkpoint-step-3" / "optimizer.safetensors")
    code, data = cli_json(capsys, "verify", f"{remote_url}/checkpoint-step-3")
    assert code == 1 and data["valid"] is False
    assert "checkpoint-step-3/optimizer.safetensors" in data["checkpoints"][0]["error"]
    code, out, _ = cli(capsys, "verify", remote_url)
    assert code == 1 and "1 of 3 checkpoints INVALID" in out


def test_verify_missing_manifest_is_invalid(capsys: pytest.CaptureFixture[str], run: Path) -> None:
    (run / "checkpoint-step-1" / "manifest.json").unlink()
    code, out, _ = cli(capsys, "verify", str(run))
    assert code == 1 and "manifest.json" in out


@pytest.mark.parametrize("target", ["missing", "nosuch://bucket/run", "empty", "file-missing-ckpt"])
def test_verify_access_and_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path, target: str) -> None:
    (tmp_path / "empty").mkdir()
    url = {
        "missing": str(tmp_path / "nope"),
        "empty": str(tmp_path / "empty"),
        "file-missing-ckpt": f"file://{tmp_path}/empty/checkpoint-step-9",
    }.get(target, target)
    code, out, err = cli(capsys, "verify", url)
    assert code == 2
    assert out == ""
    assert err.startswith("syncckpt: error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "option",
    ['client_kwargs={"endpoint_url": "http://127.0.0.1:9"', "client_kwargs=http://127.0.0.1:9", "key=["],
)
def test_a_storage_option_that_does_not_parse_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], option: str
) -> None:
    """A JSON object with a missing brace (or a string where s3fs reads a mapping) used to reach the backend as a
    string and end in a 26-line AttributeError, exit 1 ("verification failed")."""
    code, out, err = cli(capsys, "ls", "s3://bucket/run", "--storage-option", option)
    assert code == 2 and out == ""
    assert err.startswith("syncckpt: error: ") and err.count("\n") == 1 and "Traceback" not in err
    key = option.split("=", 1)[0]
    assert key in err and "127.0.0.1" not in err  # names the option, never echoes its value (it may be a secret)


def test_json_error_object(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = cli(capsys, "--json", "ls", str(tmp_path / "nope"))
    assert code == 2 and json.loads(out) == {"error": json.loads(out)["error"], "exit_code": 2}
    assert "nope" in json.loads(out)["error"] and err.startswith("syncckpt: error:")


# ---- pull -----------------------------------------------------------------------------------------------------------
def test_pull_latest_then_resume(capsys: pytest.CaptureFixture[str], tmp_path: Path, remote_url: str) -> None:
    trained = make_run(tmp_path / "train")
    assert cli(capsys, "push", str(tmp_path / "train"), remote_url)[0] == 0
    dest = tmp_path / "dest"
    code, data = cli_json(capsys, "pull", remote_url, str(dest))
    assert code == 0 and data["checkpoint"] == "checkpoint-step-3" and data["downloaded"] is True
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint-step-3"]
    assert resume_step(dest, expect=trained) == 3
    code, out, _ = cli(capsys, "pull", remote_url, str(dest), "--checkpoint", "latest")
    assert code == 0 and "already present" in out


def test_pull_named_checkpoint(capsys: pytest.CaptureFixture[str], run: Path, tmp_path: Path, remote_url: str) -> None:
    assert cli(capsys, "push", str(run), remote_url)[0] == 0
    dest = tmp_path / "dest"
    code, out, err = cli(capsys, "pull", remote_url, str(dest), "--checkpoint", "checkpoint-step-2")
    assert code == 0, err
    assert "checkpoint-step-2" in out
    assert resume_step(dest) == 2
    dest2 = tmp_path / "dest2"  # the checkpoint named in the URL itself
    assert cli(capsys, "pull", f"{remote_url}/checkpoint-step-1", str(dest2))[0] == 0
    assert resume_step(dest2) == 1
    dest3 = tmp_path / "dest3"  # a mirror on a mounted drive is a plain path
    remote_root = Path(remote_url.removeprefix("file://"))
    assert cli(capsys, "pull", str(remote_root / "checkpoint-step-2"), str(dest3))[0] == 0
    assert resume_step(dest3) == 2


def test_pull_from_a_training_folder_says_nothing_of_latest_but_a_damaged_one_is_named(
    capsys: pytest.CaptureFixture[str], run: Path, tmp_path: Path, remote_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A training folder never has LATEST (only mirrors do), so pulling from one used to warn that it was
    missing. A mirror given as a URL without it, or any folder with a damaged one, is still reported."""
    code, out, err = cli(capsys, "pull", str(run), str(tmp_path / "d1"))
    assert code == 0 and "checkpoint-step-3" in out
    assert "LATEST" not in err + caplog.text
    assert cli(capsys, "push", str(run), remote_url)[0] == 0
    remote_root = Path(remote_url.removeprefix("file://"))
    (remote_root / "LATEST").unlink()
    assert cli(capsys, "pull", remote_url, str(tmp_path / "d2"))[0] == 0
    assert "LATEST is missing or damaged" in capsys.readouterr().err + caplog.text
    caplog.clear()
    (run / "LATEST").write_bytes(b"{not json")
    assert cli(capsys, "pull", str(run), str(tmp_path / "d3"))[0] == 0
    assert "LATEST is missing or damaged" in capsys.readouterr().err + caplog.text


def test_pull_errors(capsys: pytest.CaptureFixture[str], run: Path, tmp_path: Path, remote_url: str) -> None:
    assert cli(capsys, "pull", remote_url, str(tmp_path / "d"))[0] == 2  # nothing there
    assert cli(capsys, "pull", remote_url, str(tmp_path / "d"), "--checkpoint", "not-a-name")[0] == 2
    assert cli(capsys, "push", str(run), remote_url)[0] == 0
    assert cli(capsys, "pull", remote_url, str(tmp_path / "d"), "--checkpoint", "checkpoint-step-9")[0] == 2
    for conflicting in ("latest", "checkpoint-step-2"):  # the URL names step 1: which one was meant?
        code, out, err = cli(capsys, "pull", f"{remote_url}/checkpoint-step-1", str(tmp_path / "d"), "--checkpoint",
                             conflicting)  # fmt: skip
        assert code == 2 and "names checkpoint checkpoint-step-1 and --checkpoint says" in err and err.count("\n") == 1
    assert cli(capsys, "pull", f"{remote_url}/checkpoint-step-1", str(tmp_path / "e"), "--checkpoint",
               "checkpoint-step-1")[0] == 0  # fmt: skip
    remote_root = Path(remote_url.removeprefix("file://"))
    flip_byte(remote_root / "checkpoint-step-3" / "model.safetensors")
    code, out, err = cli(capsys, "pull", remote_url, str(tmp_path / "d"), "--checkpoint", "checkpoint-step-3")
    assert code == 1 and "model.safetensors" in err
    assert not (tmp_path / "d" / "checkpoint-step-3").exists()
    # Without --checkpoint the damaged newest is skipped for the next valid one.
    code, data = cli_json(capsys, "pull", remote_url, str(tmp_path / "d"))
    assert code == 0 and data["checkpoint"] == "checkpoint-step-2"


# ---- push -----------------------------------------------------------------------------------------------------------
def test_push_transformers_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path, remote_url: str) -> None:
    folder = make_trainer_folder(tmp_path / "output", step=7, epoch=1.5)
    code, out, err = cli(capsys, "push", str(folder), remote_url)
    assert code == 0, err
    assert "checkpoint-7" in out and "LATEST" in out
    manifest = Manifest.from_bytes((folder / "manifest.json").read_bytes())
    assert (manifest.kind, manifest.global_step, manifest.epoch) == ("step", 7, 1)
    assert sorted(f.path for f in manifest.files) == ["config.json", "model.safetensors", "trainer_state.json"]

    code, data = cli_json(capsys, "ls", remote_url)
    assert code == 0 and [(c["name"], c["global_step"]) for c in data["checkpoints"]] == [("checkpoint-7", 7)]
    assert cli(capsys, "verify", remote_url)[0] == 0

    # An older checkpoint pushed later never moves LATEST backwards.
    make_run(tmp_path / "older", steps=(2,))
    code, data = cli_json(capsys, "push", str(tmp_path / "older" / "checkpoint-step-2"), remote_url)
    assert code == 0 and data["pushed"][0]["latest"] is False
    r = open_remote(remote_url)
    assert r.read_latest().name == "checkpoint-7"
    r.close()


def test_push_folder_of_checkpoints_skips_incomplete(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, remote_url: str
) -> None:
    out_dir = tmp_path / "output"
    make_trainer_folder(out_dir, step=5)
    make_trainer_folder(out_dir, step=10)
    (out_dir / "checkpoint-15").mkdir()  # still being written: no trainer_state.json
    (out_dir / "checkpoint-15" / "model.safetensors").write_bytes(b"partial")
    code, data = cli_json(capsys, "push", str(out_dir), remote_url)
    assert code == 0
    assert [p["name"] for p in data["pushed"]] == ["checkpoint-5", "checkpoint-10"]
    assert [s["name"] for s in data["skipped"]] == ["checkpoint-15"]
    assert remote_names(remote_url) == ["checkpoint-10", "checkpoint-5"]


def test_push_errors(capsys: pytest.CaptureFixture[str], run: Path, tmp_path: Path, remote_url: str) -> None:
    flip_byte(run / "checkpoint-step-1" / "model.safetensors")
    code, data = cli_json(capsys, "push", str(run), remote_url)
    assert code == 1 and [x["name"] for x in data["invalid"]] == ["checkpoint-step-1"]
    assert "model.safetensors" in data["invalid"][0]["error"]
    assert remote_names(remote_url) == ["checkpoint-step-2", "checkpoint-step-3"]
    (tmp_path / "plain").mkdir()
    assert cli(capsys, "push", str(tmp_path / "plain"), remote_url)[0] == 2
    assert cli(capsys, "push", str(tmp_path / "missing"), remote_url)[0] == 2


def test_push_respects_the_lease(capsys: pytest.CaptureFixture[str], run: Path, remote_url: str) -> None:
    other = Lease(open_remote(remote_url), heartbeat=None)
    other.acquire()
    try:
        code, out, err = cli(capsys, "push", str(run), remote_url)
        assert code == 2 and "--takeover" in err and err.count("\n") == 1
        assert remote_names(remote_url) == []
        assert cli(capsys, "push", str(run), remote_url, "--takeover")[0] == 0
        assert len(remote_names(remote_url)) == 3
    finally:
        other.release()


# ---- prune ----------------------------------------------------------------------------------------------------------
def test_prune_local_dry_run_then_real(capsys: pytest.CaptureFixture[str], run: Path) -> None:
    code, out, err = cli(capsys, "prune", str(run), "--keep-last", "1", "--dry-run")
    assert code == 0, err
    assert "would delete checkpoint-step-1" in out and "would delete checkpoint-step-2" in out
    assert len([p for p in run.iterdir() if p.name.startswith("checkpoint-")]) == 3
    code, data = cli_json(capsys, "prune", str(run), "--keep-last", "1")
    assert code == 0 and data["deleted"] == ["checkpoint-step-1", "checkpoint-step-2"]
    assert data["kept"] == ["checkpoint-step-3"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-step-3"]


def test_prune_remote(capsys: pytest.CaptureFixture[str], run: Path, remote_url: str) -> None:
    assert cli(capsys, "push", str(run), remote_url)[0] == 0
    code, data = cli_json(capsys, "prune", remote_url, "--keep-last", "2", "--dry-run")
    assert code == 0 and data["dry_run"] is True and data["deleted"] == ["checkpoint-step-1"]
    assert len(remote_names(remote_url)) == 3
    code, out, _ = cli(capsys, "prune", remote_url, "--keep-last", "2")
    assert code == 0 and "deleted checkpoint-step-1" in out
    assert remote_names(remote_url) == ["checkpoint-step-2", "checkpoint-step-3"]
    code, out, _ = cli(capsys, "prune", remote_url, "--keep-last", "2")
    assert code == 0 and "nothing to delete" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["prune", "x", "--keep-last", "0"],
        ["prune", "x"],
        ["prune", "x", "--keep-last", "two"],
        ["--storage-option", "no-equals-sign", "ls", "x"],
        ["ls"],
        [],
        ["frobnicate"],
        ["watch", "d", "u", "--interval", "-1"],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = cli(capsys, *argv)
    assert code == 2
    assert out == ""
    if argv:
        assert err.startswith("syncckpt: error: ") and err.count("\n") == 1


# ---- watch ----------------------------------------------------------------------------------------------------------
def test_watch_once_mirrors_manager_trainer_and_lightning(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, remote_url: str
) -> None:
    out_dir = tmp_path / "output"
    make_run(out_dir, steps=(1, 2), keep_last=1)  # a syncckpt manager writing into the folder
    make_trainer_folder(out_dir, step=7)
    (out_dir / "checkpoint-9").mkdir()  # a trainer folder still being written
    (out_dir / "epoch=0-step=100.ckpt").write_bytes(os.urandom(300))
    (out_dir / "last.ckpt").write_bytes(os.urandom(300))

    code, data = cli_json(capsys, "watch", str(out_dir), remote_url, "--once", "--settle", "0")
    assert code == 0, data
    assert data["mirrored"] == ["checkpoint-step-2", "checkpoint-7", "checkpoint-step-100", "checkpoint-step-101"]
    assert remote_names(remote_url) == [
        "checkpoint-7",
        "checkpoint-step-100",
        "checkpoint-step-101",
        "checkpoint-step-2",
    ]
    assert (out_dir / "checkpoint-7" / "manifest.json").exists()
    assert not [p for p in (out_dir / ".syncckpt").iterdir()]  # wrapper copies removed once queued
    r = open_remote(remote_url)
    latest = r.read_latest()
    wrapped, _ = r.read_manifest("checkpoint-step-100")
    r.close()
    assert latest.name == "checkpoint-step-101"  # last.ckpt: numbered after the highest step seen
    assert [f.path for f in wrapped.files] == ["epoch_0-step_100.ckpt"]
    assert wrapped.extra["source_file"] == "epoch=0-step=100.ckpt"
    assert cli(capsys, "verify", remote_url)[0] == 0

    # A second run (a restart) finds everything mirrored already.
    code, data = cli_json(capsys, "watch", str(out_dir), remote_url, "--once", "--settle", "0")
    assert code == 0 and data["mirrored"] == []

    # A new checkpoint from the manager is mirrored next time; the remote keeps the newest step checkpoints.
    make_run(out_dir, steps=(200,), keep_last=1)
    code, out, err = cli(capsys, "watch", str(out_dir), remote_url, "--once", "--settle", "0", "--keep-last", "2")
    assert code == 0, err
    assert out.strip() == f"mirrored checkpoint-step-200 -> {remote_url}"
    assert remote_names(remote_url) == ["checkpoint-step-101", "checkpoint-step-200"]


def test_watch_once_waits_for_unsettled_folders(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, remote_url: str
) -> None:
    out_dir = tmp_path / "output"
    make_trainer_folder(out_dir, step=3)
    (out_dir / "last.ckpt").write_bytes(b"x" * 10)
    code, out, _ = cli(capsys, "watch", str(out_dir), remote_url, "--once", "--settle", "3600")
    assert code == 0 and "nothing new" in out
    assert remote_names(remote_url) == []
    assert not (out_dir / "checkpoint-3" / "manifest.json").exists()
    assert cli(capsys, "watch", str(tmp_path / "missing"), remote_url, "--once")[0] == 2


def test_watch_reports_corrupt_folder_exit_1(capsys: pytest.CaptureFixture[str], run: Path, remote_url: str) -> None:
    (run / "checkpoint-step-1" / "manifest.json").write_text("{not json")
    code, data = cli_json(capsys, "watch", str(run), remote_url, "--once", "--settle", "0")
    assert code == 1 and data["problems"] == 1
    assert sorted(data["mirrored"]) == ["checkpoint-step-2", "checkpoint-step-3"]


def test_upload_failure_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, run: Path, remote_url: str
) -> None:
    from syncckpt.errors import RemoteError
    from syncckpt.remote.fsspec import FsspecRemote

    def broken(self: FsspecRemote, *args: Any, **kwargs: Any) -> None:
        raise RemoteError(f"{self.url}: upload failed: the store said no")

    monkeypatch.setattr(FsspecRemote, "commit_checkpoint", broken)
    code, out, err = cli(capsys, "watch", str(run), remote_url, "--once", "--settle", "0")
    assert code == 2 and "the store said no" in err and err.strip().splitlines()[-1].startswith("syncckpt: error:")
    code, out, err = cli(capsys, "push", str(run), remote_url)
    assert code == 2 and "the store said no" in err and "Traceback" not in err
    assert not (Path(remote_url.removeprefix("file://")) / "LEASE").exists()


def test_watch_stops_cleanly_on_sigterm(tmp_path: Path, remote_url: str) -> None:
    out_dir = tmp_path / "output"
    make_run(out_dir, steps=(1,))
    proc = subprocess.Popen(
        [syncckpt_script(), "watch", str(out_dir), remote_url, "--interval", "0.2", "--settle", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()  # blocks until the first checkpoint is mirrored
        assert first.strip() == f"mirrored checkpoint-step-1 -> {remote_url}", proc.stderr.read()
        make_trainer_folder(out_dir, step=5)
        second = proc.stdout.readline()
        assert second.strip() == f"mirrored checkpoint-5 -> {remote_url}"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, proc.stderr.read()
    assert remote_names(remote_url) == ["checkpoint-5", "checkpoint-step-1"]
    assert not (Path(remote_url.removeprefix("file://")) / "LEASE").exists()  # the lease was released


# ---- S3 (moto) ------------------------------------------------------------------------------------------------------
def test_s3_round_trip_never_prints_credentials(
    capsys: pytest.CaptureFixture[str],
    run: Path,
    tmp_path: Path,
    s3_remote_url: str,
    s3_storage_options: dict[str, Any],
) -> None:
    secret = s3_storage_options["secret"]
    flags = [
        arg
        for key, value in s3_storage_options.items()
        for arg in ("--storage-option", f"{key}={json.dumps(value) if isinstance(value, dict) else value}")
    ]
    seen = []

    def run_cli(*argv: str) -> tuple[int, str]:
        code, out, err = cli(capsys, *flags, *argv)
        seen.append(out + err)
        return code, out

    assert run_cli("push", str(run), s3_remote_url)[0] == 0
    code, out = run_cli("--json", "ls", s3_remote_url)
    assert code == 0 and [c["name"] for c in json.loads(out)["checkpoints"]][0] == "checkpoint-step-3"
    assert run_cli("verify", s3_remote_url)[0] == 0
    assert run_cli("pull", s3_remote_url, str(tmp_path / "dest"))[0] == 0
    assert resume_step(tmp_path / "dest") == 3
    assert run_cli("prune", s3_remote_url, "--keep-last", "1")[0] == 0
    assert remote_names(s3_remote_url, s3_storage_options) == ["checkpoint-step-3"]
    missing_bucket = s3_remote_url.replace("syncckpt-test", "no-such-bucket-here")
    code, _ = run_cli("--verbose", "ls", missing_bucket)
    assert code == 2
    assert all(secret not in text for text in seen)


# ---- a damaged checkpoint never wins: prune, rm, ls and verify ----------------------------------------------------
@pytest.fixture(params=["local", "file", "s3"])
def damaged_run(request, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, list[str]]:
    """Steps 1-3 with step 3 damaged (a flipped byte in its model file), in a local folder or a remote run;
    returns (URL, extra CLI arguments)."""
    directory = tmp_path / "ckpts"
    make_run(directory)
    if request.param == "local":
        flip_byte(directory / "checkpoint-step-3" / "model.safetensors")
        return str(directory), []
    if request.param == "file":
        url, options, args = f"file://{tmp_path}/remote/run", None, []
    else:
        options = request.getfixturevalue("s3_storage_options")
        url = request.getfixturevalue("s3_remote_url")
        args = ["--storage-option", f"client_kwargs={json.dumps(options['client_kwargs'])}"]
    remote = open_remote(url, options)
    try:  # commit all three, then damage step 3 in the store (an upload reads back what it wrote)
        for name in ("checkpoint-step-1", "checkpoint-step-2", "checkpoint-step-3"):
            folder = directory / name
            manifest = Manifest.from_bytes((folder / "manifest.json").read_bytes())
            remote.commit_checkpoint(name, folder, manifest, (folder / "manifest.json").read_bytes(), None)
        data = bytearray(remote.read_bytes("checkpoint-step-3/model.safetensors", max_size=1 << 30))
        data[len(data) // 2] ^= 0xFF
        remote.write_bytes("checkpoint-step-3/model.safetensors", bytes(data))
    finally:
        remote.close()
    return url, args


def test_prune_never_keeps_an_invalid_checkpoint_over_a_valid_one(capsys, damaged_run) -> None:
    url, args = damaged_run
    code, data = cli_json(capsys, *args, "prune", url, "--keep-last", "1", "--dry-run")
    assert code == 0 and data["deleted"] == ["checkpoint-step-1"] and data["kept"] == ["checkpoint-step-2"]
    assert "SHA-256 mismatch" in data["invalid"]["checkpoint-step-3"]
    code, out, _ = cli(capsys, *args, "prune", url, "--keep-last", "1")
    assert code == 0 and "INVALID  checkpoint-step-3" in out and "quarantined, not deleted" in out
    code, data = cli_json(capsys, *args, "ls", url)
    assert [r["name"] for r in data["checkpoints"]] == ["checkpoint-step-2"]
    assert [q["name"] for q in data["quarantined"]] == ["checkpoint-step-3"]
    code, out, _ = cli(capsys, *args, "verify", url)  # reported from the quarantine, not downloaded again
    assert code == 1 and "ok       checkpoint-step-2" in out
    assert "QUARANTINED  checkpoint-step-3: " in out and "SHA-256 mismatch" in out
    assert "1 of 2 checkpoints INVALID (1 quarantined earlier)" in out


def test_prune_verifies_the_newest_checkpoint_of_another_kind_before_deleting_older_ones(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Epoch checkpoints are deleted (--keep-epochs 0) while the only, newest, step checkpoint is damaged: it is
    verified and quarantined, and the newest epoch checkpoint stays as the newest healthy one. It used to be kept
    unverified and every epoch checkpoint deleted, leaving the resume an older state."""
    directory = tmp_path / "ck"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    with CheckpointManager(directory, save_every_n_steps=None, keep_last=1, keep_epochs=3, handle_sigterm=False) as m:
        m.register(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
        for epoch in range(3):
            assert m.save_epoch(epoch, global_step=10 * (epoch + 1))
        m.save(35, epoch=3, batch_idx=4)
        assert m.wait()
    assert sorted(p.name for p in directory.glob("checkpoint-*")) == [
        *(f"checkpoint-epoch-{e}" for e in range(3)),
        "checkpoint-step-35",
    ]
    flip_byte(directory / "checkpoint-step-35" / "model.safetensors")
    code, data = cli_json(capsys, "prune", str(directory), "--keep-last", "1", "--keep-epochs", "0")
    assert code == 0 and "SHA-256 mismatch" in data["invalid"]["checkpoint-step-35"]
    assert data["kept"] == ["checkpoint-epoch-2"] and data["deleted"] == ["checkpoint-epoch-0", "checkpoint-epoch-1"]
    assert resume_step(directory) == 30


def test_rm_deletes_one_checkpoint_and_refuses_the_last_valid_one(capsys, damaged_run) -> None:
    url, args = damaged_run
    assert cli(capsys, *args, "rm", f"{url}/checkpoint-step-1")[0] == 0
    code, out, err = cli(capsys, *args, "rm", f"{url}/checkpoint-step-2")
    assert code == 2 and "refusing to delete" in err and "last valid checkpoint" in err and "--force" in err
    code, out, _ = cli(capsys, *args, "rm", f"{url}/checkpoint-step-3")  # the damaged one: nothing valid is lost
    assert code == 0 and "deleted" in out
    code, data = cli_json(capsys, *args, "ls", url)
    assert [r["name"] for r in data["checkpoints"]] == ["checkpoint-step-2"] and data["quarantined"] == []
    assert cli(capsys, *args, "rm", "--force", f"{url}/checkpoint-step-2")[0] == 0
    assert cli(capsys, *args, "rm", f"{url}/checkpoint-step-2")[0] == 2  # gone: "no such checkpoint"


def test_rm_on_a_remote_run_repoints_latest_and_removes_the_quarantine_entry(capsys, tmp_path: Path) -> None:
    directory, url = tmp_path / "ckpts", f"file://{tmp_path}/remote/run"
    make_run(directory, remote=url)
    remote = open_remote(url)
    assert remote.read_latest().name == "checkpoint-step-3"
    quarantine.quarantine_remote(remote, "checkpoint-step-1", remote.read_latest().manifest_sha256, "for the test")
    assert cli(capsys, "rm", f"{url}/checkpoint-step-3")[0] == 0
    assert remote.read_latest().name == "checkpoint-step-2"
    assert cli(capsys, "rm", f"{url}/checkpoint-step-1")[0] == 0
    assert quarantine.read_index(remote) == {}
    assert remote_names(url) == ["checkpoint-step-2"]


def test_rm_needs_a_checkpoint_name(capsys, run: Path) -> None:
    code, _, err = cli(capsys, "rm", str(run))
    assert code == 2 and "name one checkpoint" in err
    # a mistyped name is called one, not taken for the run's folder ("e.g. RUN/bestmodel/checkpoint-step-500")
    code, _, err = cli(capsys, "rm", f"{run}/bestmodel")
    assert code == 2 and "'bestmodel' is not a checkpoint name" in err and f"syncckpt ls {run}" in err


def test_ls_fits_an_80_column_cell_even_with_long_names(tmp_path: Path) -> None:
    # issue 18: `syncckpt ls` printed 89-column lines, which wrap in a notebook cell (80 columns, no terminal)
    directory = tmp_path / "ckpts"
    make_run(directory, steps=(123456, 1234567))
    env = {**os.environ, "COLUMNS": "80"}
    listed = subprocess.run([syncckpt_script(), "ls", str(directory)], capture_output=True, text=True, env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, listed.stdout
    assert lines[0].split() == ["checkpoint", "kind", "step", "epoch", "size", "created", "healthy", "mirrored"]
    assert lines[1].split()[0] == "checkpoint-step-1234567" and lines[1].split()[6].startswith("20")
    wide = subprocess.run([syncckpt_script(), "ls", str(directory)], capture_output=True, text=True,
                          env={**env, "COLUMNS": "200"})  # fmt: skip
    assert "T" in wide.stdout.splitlines()[1].split()[6]  # a wide terminal shows the full ISO 8601 time
