"""The Kaggle/Colab quickstart notebook, run headless in a real kernel: a session cut short, a kernel restart with
an empty local disk, and a resume from the remote. Plus syncckpt.env (platform detection, disk budget)."""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

import pytest

from syncckpt import env

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "kaggle_quickstart.ipynb"


# ---- the notebook ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel_name() -> str:
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(user=True, kernel_name="python3")
    return "python3"


def _text(nb) -> str:
    """Everything the cells printed (stdout, stderr, results, tracebacks)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out["text"])
            elif "data" in out:
                parts.append(out["data"].get("text/plain", ""))
            elif out.get("output_type") == "error":
                parts.append("\n".join(out.get("traceback", [])))
    return "".join(parts)


def _run_all(client, nb) -> str:
    for cell in nb.cells:
        cell.outputs = []
    for index, cell in enumerate(nb.cells):
        client.execute_cell(cell, index)
    return _text(nb)


def test_notebook_resumes_from_remote_after_kernel_restart(tmp_path, monkeypatch, kernel_name):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.util import run_sync

    remote_dir, ckpt_dir = tmp_path / "remote", tmp_path / "checkpoints"
    monkeypatch.setenv("SYNCCKPT_REMOTE", remote_dir.as_uri())
    monkeypatch.setenv("SYNCCKPT_DIR", str(ckpt_dir))
    monkeypatch.setenv("MAX_STEPS_THIS_SESSION", "12")  # each session trains at most 12 of the 16 steps
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOK.parents[1]))
    for name in ("KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, kernel_name=kernel_name, timeout=120, allow_errors=False, resources={"metadata": {"path": str(tmp_path)}}
    )
    with client.setup_kernel():
        first = _run_all(client, nb)
        assert "No checkpoint yet: starting from scratch" in first, first
        assert "Session limit reached at global step 12" in first, first
        assert "checkpoint-step-10" in first  # committed and mirrored before the session ended

        run_sync(client.km.restart_kernel)(now=False)  # graceful: the old kernel flushes and releases its lease
        shutil.rmtree(ckpt_dir)  # a new machine: the local disk is empty

        second = _run_all(client, nb)
    assert "Resuming from checkpoint checkpoint-step-10 at global step 10" in second, second
    assert "Pulled checkpoint-step-10 from" in second
    assert "Resuming mid-epoch from epoch 2" in second  # step 10 is batch 2 of the second epoch (8 per epoch)
    assert "Training finished at global step 16" in second, second
    assert "Traceback" not in first + second
    assert (remote_dir / "LATEST").exists()
    assert "checkpoint-step-15" in {p.name for p in remote_dir.iterdir()}


def test_notebook_is_clean_and_uses_the_python3_kernel():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    source = "\n".join(c.source for c in nb.cells)
    for needed in (
        "from kaggle_secrets import UserSecretsClient",
        "from google.colab import userdata",
        "SYNCCKPT_REMOTE",
        "MAX_STEPS_THIS_SESSION",
        "info = mgr.resume()",
        "ResumableSampler",
        'importlib.util.find_spec("syncckpt") is None',  # the install cell: the attached wheel when not installed
        "/kaggle/input/*/syncckpt-*-py3-none-any.whl",
    ):
        assert needed in source


# ---- syncckpt.env ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("environ", "kaggle_dir", "colab", "expected"),
    [
        ({}, False, False, None),
        ({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, False, False, "kaggle"),
        ({}, True, False, "kaggle"),
        ({"COLAB_RELEASE_TAG": "release-colab_20250101"}, False, False, "colab"),
        ({}, False, True, "colab"),
        ({"KAGGLE_KERNEL_RUN_TYPE": ""}, False, False, None),
    ],
)
def test_platform_from(environ, kaggle_dir, colab, expected):
    assert env.platform_from(environ, kaggle_dir_exists=kaggle_dir, colab_importable=colab) == expected


def test_default_checkpoint_dir_follows_the_environment(monkeypatch):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.setattr(env, "_colab_importable", lambda: False)
    monkeypatch.setattr(env, "KAGGLE_WORKING", Path("/nonexistent-kaggle/working"))
    assert env.default_checkpoint_dir() == Path("checkpoints")
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20250101")
    assert env.default_checkpoint_dir() == Path("/content/checkpoints")
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert env.detect_platform() == "kaggle"


def test_colab_detected_by_import(monkeypatch):
    import types

    google = types.ModuleType("google")
    google.__path__ = []  # a package
    colab = types.ModuleType("google.colab")
    colab.__spec__ = __import__("importlib.machinery").machinery.ModuleSpec("google.colab", None)
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert env._colab_importable()
    monkeypatch.delitem(sys.modules, "google.colab")
    assert not env._colab_importable()


def test_disk_budget_problem():
    gb = env.GB
    assert env.disk_budget_problem(5 * gb, keep=3, limit_bytes=20 * gb) is None  # exactly 20 GB fits
    msg = env.disk_budget_problem(5 * gb, keep=3, limit_bytes=20 * gb, used_bytes=1)
    assert msg is not None and "lower keep_last/keep_epochs to 2" in msg and "already used" in msg
    assert "does not fit" in env.disk_budget_problem(15 * gb, keep=1, limit_bytes=20 * gb)
    with pytest.raises(ValueError):
        env.disk_budget_problem(1, keep=-1, limit_bytes=10)


def test_check_disk_budget_only_under_kaggle_working_unless_a_limit_is_given(monkeypatch):
    gb = env.GB
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert env.check_disk_budget("/tmp/ckpt", checkpoint_bytes=100 * gb, keep=5) is None
        assert env.check_disk_budget("/kaggle/working/ckpt", checkpoint_bytes=1 * gb, keep=3) is None
    with pytest.warns(env.DiskBudgetWarning, match="20.0 GB limit"):
        msg = env.check_disk_budget("/kaggle/working/checkpoints", checkpoint_bytes=8 * gb, keep=2)
    assert msg.startswith("/kaggle/working/checkpoints: keeping 2 checkpoints of 8.0 GB")
    with pytest.warns(env.DiskBudgetWarning, match="1.0 GB limit"):
        env.check_disk_budget("/tmp/ckpt", checkpoint_bytes=gb // 2, keep=2, limit_bytes=gb)
