"""Where the run lives: Kaggle and Colab detection, their checkpoint folders, and Kaggle's disk budget.

Kaggle keeps at most 20 GB under ``/kaggle/working`` (everything else is lost with the session); Colab's
``/content`` is lost on every runtime reset. Checkpoints still go to the local disk first (and to a remote with
``remote=``), so the local folder only has to hold what retention keeps plus the one being written.

The decisions are pure functions over plain values (an environ mapping, a "does this path exist" answer), so they
are testable anywhere; :func:`detect_platform`, :func:`default_checkpoint_dir` and :func:`check_disk_budget` are
the thin wrappers that look at the real machine.

>>> platform_from(environ={"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, kaggle_dir_exists=False, colab_importable=False)
'kaggle'
>>> checkpoint_dir_for("colab")
PosixPath('/content/checkpoints')
>>> disk_budget_problem(checkpoint_bytes=6 * GB, keep=3, limit_bytes=KAGGLE_WORKING_LIMIT) is not None
True
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError
from .manifest import MANIFEST_NAME, parse_checkpoint_name
from .remote import check_url
from .status import size_text

log = logging.getLogger("syncckpt")

GB = 1000**3
#: Kaggle's limit on ``/kaggle/working`` (the only folder kept as the notebook's output).
KAGGLE_WORKING_LIMIT = 20 * GB
KAGGLE_WORKING = Path("/kaggle/working")
KAGGLE_INPUT = Path("/kaggle/input")  # attached Datasets and Models, read-only
COLAB_CONTENT = Path("/content")
COLAB_DRIVE = COLAB_CONTENT / "drive"


class DiskBudgetWarning(UserWarning):
    """The checkpoints a run keeps locally may not fit the platform's disk limit."""


def platform_from(environ: Mapping[str, str], kaggle_dir_exists: bool, colab_importable: bool) -> str | None:
    """``"kaggle"``, ``"colab"`` or None, from what the machine looks like (pure; see :func:`detect_platform`).

    >>> platform_from({}, kaggle_dir_exists=True, colab_importable=False)
    'kaggle'
    >>> platform_from({"COLAB_RELEASE_TAG": "release-colab_20240101"}, False, False)
    'colab'
    >>> platform_from({}, False, colab_importable=True), platform_from({}, False, False)
    ('colab', None)
    """
    if environ.get("KAGGLE_KERNEL_RUN_TYPE") or kaggle_dir_exists:
        return "kaggle"
    if environ.get("COLAB_RELEASE_TAG") or colab_importable:
        return "colab"
    return None


#: Environment variables set in TPU sessions (the TPU runtime's, torch_xla's and Colab's; see :func:`tpu_from`).
TPU_ENV_VARS = ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "XRT_TPU_CONFIG", "COLAB_TPU_ADDR")


def tpu_from(environ: Mapping[str, str], accel_device_exists: bool) -> bool:
    """Whether this looks like a TPU session (pure; see :func:`detect_tpu`): one of :data:`TPU_ENV_VARS` is set,
    or a TPU chip's device node (``/dev/accel0``) exists. A heuristic: Kaggle documents no flag for it.

    >>> tpu_from({"TPU_ACCELERATOR_TYPE": "v3-8"}, False), tpu_from({}, True), tpu_from({"TPU_NAME": ""}, False)
    (True, True, False)
    """
    return any(environ.get(name) for name in TPU_ENV_VARS) or accel_device_exists


def detect_tpu(environ: Mapping[str, str] | None = None, dev: Path = Path("/dev")) -> bool:
    """Whether this process runs in a TPU session (:func:`tpu_from` over ``environ`` and ``dev/accel0``).

    >>> import tempfile
    >>> fake = Path(tempfile.mkdtemp()); _ = (fake / "accel0").write_text("")
    >>> detect_tpu({}, dev=fake), detect_tpu({}, dev=fake / "none")
    (True, False)
    """
    return tpu_from(os.environ if environ is None else environ, (dev / "accel0").exists())


def detect_platform() -> str | None:
    """The notebook platform this process runs on: ``"kaggle"``, ``"colab"`` or None (anything else).

    Kaggle: ``KAGGLE_KERNEL_RUN_TYPE`` is set or ``/kaggle/working`` exists. Colab: ``COLAB_RELEASE_TAG`` is set or
    ``google.colab`` is importable.

    >>> detect_platform() in ("kaggle", "colab", None)
    True
    """
    return platform_from(os.environ, KAGGLE_WORKING.is_dir(), _colab_importable())


def _colab_importable() -> bool:
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):  # no "google" package at all, or a broken namespace package
        return False


def checkpoint_dir_for(platform: str | None) -> Path:
    """The local checkpoint folder for a platform (pure; see :func:`default_checkpoint_dir`).

    >>> checkpoint_dir_for("kaggle"), checkpoint_dir_for(None)
    (PosixPath('/kaggle/working/checkpoints'), PosixPath('checkpoints'))
    """
    if platform == "kaggle":
        return KAGGLE_WORKING / "checkpoints"
    if platform == "colab":
        return COLAB_CONTENT / "checkpoints"
    return Path("checkpoints")


def default_checkpoint_dir() -> Path:
    """``/kaggle/working/checkpoints`` on Kaggle, ``/content/checkpoints`` on Colab, else ``./checkpoints``.

    >>> default_checkpoint_dir().name
    'checkpoints'
    """
    return checkpoint_dir_for(detect_platform())


def find_input_runs(root: Path, max_depth: int = 4) -> list[Path]:
    """Folders under ``root`` (at most ``max_depth`` levels down) that hold checkpoint folders: an attached
    Kaggle Dataset or Model version of a run. Only lists; nothing is opened for writing.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "my-run-ckpts" / "checkpoint-step-40").mkdir(parents=True)
    >>> _ = (root / "my-run-ckpts" / "checkpoint-step-40" / "manifest.json").write_text("{}")
    >>> [p.name for p in find_input_runs(root)]
    ['my-run-ckpts']
    """
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        if any(parse_checkpoint_name(p.name) and (p / MANIFEST_NAME).is_file() for p in children):
            found.append(folder)
        elif depth < max_depth:
            for child in children:
                walk(child, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return found


def default_inputs(platform: str | None) -> list[Path]:
    """Read-only folders ``resume()`` also looks in by default: on Kaggle, runs attached under ``/kaggle/input``
    (a Dataset version made from a previous session's checkpoints resumes with no download); elsewhere none."""
    return find_input_runs(KAGGLE_INPUT) if platform == "kaggle" else []


def check_mirror_url(url: str) -> None:
    """ConfigError when ``url`` cannot be this session's mirror: a mistyped ``://`` (``check_url``), or one of
    :func:`mirror_problem`'s reasons for this platform and working directory. The uploader's check, and the
    config's (so that a bad ``remote:`` is reported against the file and key)."""

    check_url(url)  # a mistyped "://" first: its message names the URL that was meant
    problem = mirror_problem(url, detect_platform(), os.getcwd())
    if problem is not None:
        raise ConfigError(problem)


def mirror_problem(url: str, platform: str | None, cwd: str) -> str | None:
    """Why ``url`` cannot be the mirror of a run on ``platform`` (working directory ``cwd``), or None. Pure.

    A mirror must outlive the session. A path without a scheme that is not absolute is refused: ``bucket/run``
    was meant as a bucket far more often than as a folder under the working directory. On Kaggle a folder under
    ``/kaggle/working``, and on Colab one under ``/content`` outside the mounted Drive, die with the session.

    >>> mirror_problem("s3://bucket/run", "kaggle", "/kaggle/working") is None
    True
    >>> mirror_problem("bucket/run", None, "/home/me").split("; ")[0]
    "remote 'bucket/run' has no scheme, so it would be the local folder /home/me/bucket/run"
    >>> mirror_problem("/kaggle/working/mirror", "kaggle", "/kaggle/working").split(":")[0]
    "remote '/kaggle/working/mirror' is under /kaggle/working, which is deleted with the Kaggle session"
    >>> mirror_problem("/content/drive/MyDrive/run", "colab", "/content") is None
    True
    """
    path = url[len("file://") :] if url.startswith("file://") else url
    if "://" in path:
        return None
    if not os.path.isabs(path):
        local = os.path.normpath(os.path.join(cwd, path))
        return (
            f"remote {url!r} has no scheme, so it would be the local folder {local}; write s3://{path}, "
            f"gs://{path} or hf://... for a store, or an absolute path for a local folder"
        )
    where = Path(os.path.normpath(path))
    if platform == "kaggle" and where.is_relative_to(KAGGLE_WORKING):
        return (
            f"remote {url!r} is under {KAGGLE_WORKING}, which is deleted with the Kaggle session: it is not a "
            "mirror; use a bucket (s3://, gs://) or the Hub (hf://). An attached Kaggle Dataset is read-only: it "
            "is a source to resume from (under /kaggle/input), never a mirror"
        )
    if platform == "colab" and where.is_relative_to(COLAB_CONTENT) and not where.is_relative_to(COLAB_DRIVE):
        return (
            f"remote {url!r} is under {COLAB_CONTENT} but not in the mounted Drive ({COLAB_DRIVE}), and is deleted "
            "with the Colab session: it is not a mirror; use a Drive folder, a bucket or the Hub (hf://)"
        )
    return None


def disk_budget_problem(
    checkpoint_bytes: int, keep: int, limit_bytes: int, used_bytes: int = 0, keep_local: str | None = None
) -> str | None:
    """Explain why ``keep`` checkpoints of ``checkpoint_bytes`` each may not fit in ``limit_bytes``, or None.

    While a checkpoint is written the previous ones are still there, so the peak is ``keep + 1`` checkpoints
    (plus ``used_bytes`` already taken by other files). Pure: no I/O. ``keep_local`` (``"newest"``/``"none"``:
    ``keep`` is then its bound, not retention's) leaves keep_last/keep_epochs out of the advice.

    >>> print(disk_budget_problem(5 * GB, keep=2, limit_bytes=12 * GB, keep_local="newest").split("; ")[1])
    keep_local='none' fits (the newest checkpoint then stays only on the remote)

    >>> disk_budget_problem(checkpoint_bytes=4 * GB, keep=3, limit_bytes=20 * GB) is None
    True
    >>> for part in disk_budget_problem(checkpoint_bytes=6 * GB, keep=3, limit_bytes=20 * GB).split("; "):
    ...     print(part)
    keeping 3 checkpoints of 6.0 GB needs up to 24.0 GB (keep + 1 while saving), over the 20.0 GB limit
    lower keep_last/keep_epochs to 2, or mirror to a remote with keep_local='newest'
    >>> print(disk_budget_problem(checkpoint_bytes=12 * GB, keep=1, limit_bytes=20 * GB).split("; ")[1])
    even one checkpoint does not fit beside the one being written: checkpoint to a larger disk
    """
    if checkpoint_bytes < 0 or keep < 0 or limit_bytes <= 0 or used_bytes < 0:
        raise ValueError("checkpoint_bytes, keep and used_bytes must be >= 0 and limit_bytes > 0")
    peak = (keep + 1) * checkpoint_bytes + used_bytes
    if peak <= limit_bytes:
        return None
    fits = (limit_bytes - used_bytes) // checkpoint_bytes - 1 if checkpoint_bytes else keep
    used = f" (plus {size_text(used_bytes)} already used)" if used_bytes else ""
    msg = (
        f"keeping {keep} checkpoint{'s' if keep != 1 else ''} of {size_text(checkpoint_bytes)} needs up to "
        f"{size_text(peak)}{used} (keep + 1 while saving), over the {size_text(limit_bytes)} limit; "
    )
    if fits >= 1 and keep_local == "newest":
        return msg + "keep_local='none' fits (the newest checkpoint then stays only on the remote)"
    if fits >= 1:
        fewer = "keep_local='newest'" if fits >= 2 else "keep_local='none'"  # peaks of 3 and 2 checkpoints
        return msg + f"lower keep_last/keep_epochs to {fits}, or mirror to a remote with {fewer}"
    return msg + "even one checkpoint does not fit beside the one being written: checkpoint to a larger disk"


def check_disk_budget(
    directory: str | os.PathLike[str],
    checkpoint_bytes: int,
    keep: int,
    limit_bytes: int | None = None,
    used_bytes: int = 0,
    keep_local: str | None = None,
) -> str | None:
    """Warn (:class:`DiskBudgetWarning`) when the checkpoints kept in ``directory`` may exceed the disk limit
    (``keep_local``: see :func:`disk_budget_problem`).

    The limit is ``limit_bytes`` when given, else Kaggle's 20 GB when ``directory`` is under ``/kaggle/working``;
    elsewhere there is no known limit and nothing is checked. Returns the warning text, or None.

    >>> check_disk_budget("/tmp/ckpt", checkpoint_bytes=50 * GB, keep=5) is None   # no known limit here
    True
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     msg = check_disk_budget("/tmp/ckpt", checkpoint_bytes=3 * GB, keep=2, limit_bytes=8 * GB)
    >>> w[0].category.__name__, msg.startswith("/tmp/ckpt: keeping 2 checkpoints")
    ('DiskBudgetWarning', True)
    """
    if limit_bytes is None:
        if not _is_under(Path(directory), KAGGLE_WORKING):
            return None
        limit_bytes = KAGGLE_WORKING_LIMIT
    problem = disk_budget_problem(checkpoint_bytes, keep, limit_bytes, used_bytes, keep_local)
    if problem is None:
        return None
    msg = f"{directory}: {problem}"
    warnings.warn(msg, DiskBudgetWarning, stacklevel=2)
    log.warning("%s", msg)
    return msg


def _is_under(path: Path, root: Path) -> bool:
    try:
        return Path(os.path.abspath(path)).is_relative_to(root)
    except (OSError, ValueError):
        return False
