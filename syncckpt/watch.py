"""``syncckpt watch``: a sidecar that mirrors the complete checkpoints any trainer writes into a folder.

The training code is not touched: the watcher scans the folder, judges what is complete, and queues it on an
:class:`~syncckpt.uploader.Uploader` (which hard-links it into its own staging folder first, so the trainer's own
retention may delete it meanwhile). What counts as complete:

- syncckpt folders: ``manifest.json`` is there (it is written last).
- transformers ``checkpoint-N`` folders: ``trainer_state.json`` is there and no file in the folder changed for
  ``settle`` seconds; a ``manifest.json`` is then written into the folder (:func:`adopt_folder`).
- Lightning ``*.ckpt`` files in the folder itself: the file did not change for ``settle`` seconds. Each is copied
  (never hard-linked: Lightning rewrites ``last.ckpt`` in place) into ``.syncckpt/checkpoint-step-N/`` and
  mirrored as that checkpoint. N is the ``step=N`` of the file name; a file without one gets 1 + the highest step
  seen, so it sorts as the newest. Its source name, size and mtime are kept in the manifest's ``extra``, so a file
  already mirrored is not mirrored again after a restart.

Checkpoints the remote already holds (identical manifest) are not uploaded again. SIGINT/SIGTERM stop
:func:`watch` after the queued uploads are flushed; a second signal stops it at once.

>>> import tempfile, pathlib
>>> from syncckpt import local
>>> from syncckpt.manifest import Manifest
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = local.commit(d, Manifest("checkpoint-step-5", "step", 5, 0, 4, files=[]),
...                  lambda tmp: [local.write_file(tmp, "model.json", [b"{}"])])
>>> (d / "epoch=0-step=9.ckpt").write_bytes(b"lightning")
9
>>> watch(d, "memory://doc-watch/run", once=True, settle=0).mirrored
['checkpoint-step-5', 'checkpoint-step-9']
>>> watch(d, "memory://doc-watch/run", once=True, settle=0).mirrored  # a restart: nothing new
[]
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import local
from .errors import CheckpointCorrupt, CheckpointNotFound, RemoteError
from .manifest import MANIFEST_NAME, Manifest, parse_checkpoint_name, same_content
from .pull import remote_listing
from .retention import Ref, recency

if TYPE_CHECKING:
    from .uploader import Uploader

log = logging.getLogger("syncckpt")

TRAINER_STATE = "trainer_state.json"  # transformers writes it into every checkpoint-N folder
STAGE_DIR = ".syncckpt"  # the watcher's own folder inside the watched one (Lightning wrappers)

_STEP_IN_NAME = re.compile(r"(?:^|[^A-Za-z0-9])step=(\d+)")
_EPOCH_IN_NAME = re.compile(r"(?:^|[^A-Za-z0-9])epoch=(\d+)")
_ODD_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")

Retention = Callable[[list[Ref]], list[str]]


@dataclass
class WatchReport:
    """What a :func:`watch` run mirrored (names, oldest first), skipped as superseded, and left pending; and how
    many checkpoints it could not mirror (each logged once as a warning)."""

    url: str
    mirrored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    problems: int = 0


def watch(
    directory: str | Path,
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    interval: float = 30.0,
    settle: float = 30.0,
    retention: Retention | None = None,
    once: bool = False,
    takeover: bool = False,
    on_mirrored: Callable[[str, str], None] | None = None,
) -> WatchReport:
    """Mirror what a trainer writes into ``directory`` to the run at ``url`` until SIGINT/SIGTERM, or (``once``)
    scan once, upload every complete checkpoint found (waiting after each, so none is skipped) and return.

    ``retention`` plans remote deletions after each upload (see :func:`syncckpt.retention.plan_deletions`); the
    local folder is left to the trainer. ``on_mirrored(name, url)`` is called once per checkpoint mirrored, after
    each scan and at the end (not with ``once``: the report lists them). Raises RemoteError when stopped with
    uploads unfinished (they stay local), and with ``once`` when an upload fails.
    """
    from .uploader import Uploader  # the upload thread machinery is only needed here

    directory = Path(directory)
    if once and not directory.is_dir():
        raise CheckpointNotFound(f"{directory}: no such folder")
    uploader = Uploader(
        url,
        storage_options=storage_options or None,
        on_error="raise" if once else "warn",
        takeover=takeover,
        retention=retention,
    )
    watcher = Watcher(directory, uploader, settle)
    stop, abort = threading.Event(), threading.Event()
    restore = _install_signal_handlers(stop, abort)
    report = _Reporter(uploader, None if once else on_mirrored)
    flushed = False
    try:
        watcher.start()
        if not once:
            log.info("Watching %s, mirroring to %s every %.0fs", directory, uploader.url, interval)
        _scan_until_stopped(watcher, once, interval, stop, report)
        if not once:
            print("syncckpt: stopping; flushing queued uploads (signal again to stop now)", file=sys.stderr)
        flushed = _flush(uploader, abort)
        uploader.raise_if_failed()
    finally:
        uploader.close(timeout=None if flushed else 0)
        restore()
    status = uploader.status()
    report()
    if not once and (status["pending"] or status["uploading"]):
        raise RemoteError(f"stopped with uploads not finished: {', '.join(status['pending'])} (they stay local)")
    return WatchReport(
        uploader.url, list(status["mirrored"]), list(status["skipped"]), list(status["pending"]), len(watcher.warned)
    )


class Watcher:
    """Finds complete checkpoints in a folder a trainer writes and queues the new ones on an Uploader.

    :func:`watch` drives it: :meth:`start` once, then :meth:`scan` and :meth:`submit` what it found, every
    interval. ``warned`` holds the checkpoints it could not mirror (each warned about once).
    """

    def __init__(self, directory: Path, uploader: Uploader, settle: float) -> None:
        self.directory = directory
        self.stage = directory / STAGE_DIR
        self.uploader = uploader
        self.settle = settle
        self.known: dict[str, Manifest] = {}  # checkpoint name -> manifest mirrored or queued
        self.ckpt_files: set[tuple[str, int, int]] = set()  # Lightning (file name, size, mtime_ns) mirrored
        self.max_step = 0
        self.warned: set[str] = set()

    def start(self) -> None:
        """Learn what the remote already holds, so nothing is uploaded twice after a restart."""
        if self.stage.is_dir():  # copies left by an earlier run that stopped before queueing them
            local.cleanup_leftovers(self.stage)
            for p in self.stage.iterdir():
                if p.is_dir() and parse_checkpoint_name(p.name) is not None:
                    local.delete(self.stage, p.name)
        manifests = remote_listing(self.uploader.remote).manifests
        for m in manifests.values():
            self.known[m.name] = m
            self.max_step = max(self.max_step, m.global_step)
            key = _ckpt_key(m)
            if key is not None:
                self.ckpt_files.add(key)

    def scan(self) -> list[tuple[Path, Manifest]]:
        """Complete checkpoints not mirrored yet, oldest first: (folder holding it, manifest)."""
        if not self.directory.is_dir():
            return []
        now = time.time()
        found: list[tuple[Path, Manifest]] = []
        ckpts: list[Path] = []
        for p in sorted(self.directory.iterdir()):
            self._judge(p, found, self._entry, p, now, ckpts)
        for _, m in found:
            self.max_step = max(self.max_step, m.global_step)
        # Files with step=N first, so a file without one (last.ckpt) is numbered after all of them.
        ckpts.sort(key=lambda p: (_STEP_IN_NAME.search(p.name) is None, p.name))
        for p in ckpts:
            self._judge(p, found, self._lightning, p, now)
        found.sort(key=lambda t: recency(Ref(t[1].name, t[1].kind, t[1].global_step, 0)))
        return found

    def submit(self, folder: Path, manifest: Manifest) -> bool:
        """Queue one checkpoint (the uploader hard-links it into its own staging folder first)."""
        try:
            self.uploader.submit(folder, manifest)
        except OSError as e:  # deleted by the trainer's own retention meanwhile
            self._warn_once(manifest.name, f"Not mirroring {folder / manifest.name}: {e}")
            return False
        finally:
            if folder == self.stage:
                local.delete(self.stage, manifest.name)  # the uploader's staging links keep the bytes
        self.known[manifest.name] = manifest
        key = _ckpt_key(manifest)
        if key is not None:
            self.ckpt_files.add(key)
        return True

    def _judge(self, path: Path, found: list[tuple[Path, Manifest]], judge: Callable[..., Any], *args: Any) -> None:
        # One damaged or vanishing entry must not stop the scan: it is reported once and tried again next time.
        try:
            item = judge(*args)
        except (CheckpointCorrupt, OSError, ValueError) as e:
            self._warn_once(path.name, f"Not mirroring {path}: {e}")
            return
        if item is not None:
            found.append(item)

    def _entry(self, path: Path, now: float, ckpts: list[Path]) -> tuple[Path, Manifest] | None:
        """A checkpoint folder judged now; a Lightning file is set aside to be numbered after the folders."""
        if path.is_dir() and parse_checkpoint_name(path.name) is not None:
            return self._folder(path, now)
        if path.suffix == ".ckpt" and path.is_file():
            ckpts.append(path)
        return None

    def _folder(self, path: Path, now: float) -> tuple[Path, Manifest] | None:
        if (path / MANIFEST_NAME).exists():
            manifest, _ = local.read_manifest(path)
        elif (path / TRAINER_STATE).exists() and _quiet_for(path, now) >= self.settle:
            manifest = adopt_folder(path)
            log.info("Wrote %s for %s", MANIFEST_NAME, path)
        else:
            return None  # still being written, or not a checkpoint folder we can judge complete
        known = self.known.get(path.name)
        if known is not None and same_content(known, manifest):
            return None
        return self.directory, manifest

    def _lightning(self, path: Path, now: float) -> tuple[Path, Manifest] | None:
        st = path.stat()
        key = (path.name, st.st_size, st.st_mtime_ns)
        if key in self.ckpt_files or now - st.st_mtime < self.settle:
            return None
        m = _STEP_IN_NAME.search(path.name)
        step = int(m.group(1)) if m else self.max_step + 1
        e = _EPOCH_IN_NAME.search(path.name)
        self.max_step = max(self.max_step, step)
        rel = _ODD_CHARS.sub("_", path.name)
        if rel.startswith((".", "-")):
            rel = "_" + rel[1:]
        manifest = Manifest(
            name=f"checkpoint-step-{step}",
            kind="step",
            global_step=step,
            epoch=int(e.group(1)) if e else 0,
            batch_idx=-1,
            files=[],
            extra={
                "source": "lightning",
                "source_file": path.name,
                "source_size": st.st_size,
                "source_mtime_ns": st.st_mtime_ns,
            },
        )

        def copy(tmp: Path) -> list[local.FileEntry]:
            with open(path, "rb") as f:
                entry = local.write_file(
                    tmp, rel, iter(lambda: f.read(8 << 20), b""), crc32c=self.uploader.remote.keeps_crc32c
                )
            after = path.stat()
            if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                raise OSError(f"{path} changed while it was copied; trying again at the next scan")
            return [entry]

        return self.stage, local.commit(self.stage, manifest, copy)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning("%s", message)


def adopt_folder(path: Path) -> Manifest:
    """Write a manifest into a checkpoint folder another tool wrote (a transformers ``checkpoint-N``), hashing
    every file; its epoch comes from ``trainer_state.json`` when present.

    >>> import json, tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp()) / "checkpoint-7"
    >>> folder.mkdir()
    >>> _ = (folder / "trainer_state.json").write_text(json.dumps({"epoch": 1.5, "global_step": 7}))
    >>> m = adopt_folder(folder)
    >>> m.name, m.global_step, m.epoch, m.extra["source"], (folder / "manifest.json").exists()
    ('checkpoint-7', 7, 1, 'transformers', True)
    """
    epoch = 0
    extra: dict[str, Any] = {}
    state_file = path / TRAINER_STATE
    if state_file.is_file():
        extra["source"] = "transformers"
        try:
            epoch = max(int(float(json.loads(state_file.read_bytes()).get("epoch") or 0)), 0)
        except (ValueError, TypeError, AttributeError, OverflowError):
            log.warning("%s: unreadable; recording epoch 0", state_file)
    return local.manifest_for_folder(path, epoch=epoch, extra=extra)


class _Reporter:
    """Calls ``on_mirrored`` once for each checkpoint the uploader has mirrored since the last call."""

    def __init__(self, uploader: Uploader, on_mirrored: Callable[[str, str], None] | None) -> None:
        self._uploader = uploader
        self._on_mirrored = on_mirrored
        self._reported: set[str] = set()

    def __call__(self) -> None:
        if self._on_mirrored is None:
            return
        for name in self._uploader.status()["mirrored"]:
            if name not in self._reported:
                self._reported.add(name)
                self._on_mirrored(name, self._uploader.url)


def _scan_until_stopped(
    watcher: Watcher, once: bool, interval: float, stop: threading.Event, report: Callable[[], None]
) -> None:
    uploader = watcher.uploader
    while True:
        for folder, manifest in watcher.scan():
            if watcher.submit(folder, manifest) and once:
                uploader.wait()  # one at a time, so no step checkpoint is skipped as superseded
                uploader.raise_if_failed()
            if stop.is_set():
                break
        report()
        if once or stop.wait(interval):
            return


def _flush(uploader: Uploader, abort: threading.Event) -> bool:
    """Wait for the queued uploads; False when a second signal cut the wait short."""
    while not uploader.wait(timeout=0.5):
        if abort.is_set():
            return False
    return True


def _ckpt_key(manifest: Manifest) -> tuple[str, int, int] | None:
    extra = manifest.extra
    if manifest.source != "lightning":
        return None
    try:
        return str(extra["source_file"]), int(extra["source_size"]), int(extra["source_mtime_ns"])
    except (KeyError, TypeError, ValueError):
        return None


def _quiet_for(path: Path, now: float) -> float:
    """Seconds since anything in the folder last changed."""
    newest = path.stat().st_mtime
    for p in path.rglob("*"):
        try:
            newest = max(newest, p.stat().st_mtime)
        except FileNotFoundError:
            continue
    return now - newest


def _install_signal_handlers(stop: threading.Event, abort: threading.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM: the first stops after flushing, the second stops at once. Returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            abort.set()
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore
