"""The parts a :class:`~syncckpt.CheckpointManager` is made of, built and wired together in one place.

:func:`assemble` checks the settings, opens the checkpoint folder, and builds the uploader (rank 0, or each node's
first rank when the nodes share no disk), the writer and the lifecycle, each handed what it calls on the others.
The manager keeps only the decisions of its methods; a front end that wants the same parts without the manager's
loop API can build them here too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .deadline import resolve_deadline, session_start
from .distributed import Dist
from .env import detect_platform
from .lifecycle import Lifecycle, check_grace_period
from .schedule import BestMetric
from .writer import Writer, check_settings, clean_directory, open_directory


@dataclass
class Parts:
    dist: Dist
    platform: str | None
    uploader: Any  # syncckpt.uploader.Uploader, or None without a remote (and on ranks that do not upload)
    writer: Writer
    life: Lifecycle


def assemble(
    directory: Path,
    best: BestMetric,
    *,
    flush: Callable[[float | None], bool],
    on_exit: Callable[[], None],
    status: Callable[[], Any],
    on_stalled: Callable[[], str | None],
    remote: str | None,
    storage_options: dict[str, Any] | None,
    remote_options: dict[str, Any] | None,
    on_upload_error: str,
    takeover: bool,
    incremental: bool,
    background_nice: int,
    keep_last: int,
    keep_epochs: int,
    keep_local: str,
    deadline: Any,
    grace_period: float,
    handle_sigterm: bool,
    save_on_sigterm: bool,
    handle_interrupt: bool,
    signals: list[int] | None,
    requeue: bool,
) -> Parts:
    """Build the parts for a manager writing into ``directory``; ``flush``, ``on_exit``, ``status`` and
    ``on_stalled`` are the manager's (the lifecycle calls them). Raises ConfigError for settings no part takes."""
    check_settings(keep_last, keep_epochs, on_upload_error, background_nice, keep_local, remote is not None)
    check_grace_period(grace_period)  # before any part starts a thread or takes a lease
    dist = Dist.detect()
    platform = detect_platform()
    token = open_directory(directory, dist)
    writer: Writer | None = None
    uploader = None
    if remote is not None and dist.uploads:  # rank 0; each node's first rank when node-local
        from .uploader import Uploader

        uploader = Uploader(
            remote,
            storage_options=storage_options,
            on_error=on_upload_error,
            takeover=takeover,
            retention=lambda refs: writer.remote_retention(refs),  # type: ignore[union-attr]
            remote_options=remote_options or {},
            incremental=incremental,
            background_nice=background_nice,
            on_mirrored=lambda manifest, on_remote: writer.mirrored(manifest, on_remote),  # type: ignore[union-attr]
            dist=dist,
        )
    clean_directory(directory, dist)
    writer = Writer(
        directory,
        dist,
        uploader,
        keep_last=keep_last,
        keep_epochs=keep_epochs,
        best=best,
        token=token,
        background_nice=background_nice,
        keep_local=keep_local,
    )
    life = Lifecycle(
        deadline=resolve_deadline(deadline, platform, session_start(platform)),
        flush=flush,
        grace_period=grace_period,
        mirrored=uploader is not None,
        handle_sigterm=handle_sigterm,
        on_exit=on_exit,
        status=status,
        save_on_sigterm=save_on_sigterm,
        handle_interrupt=handle_interrupt,
        signals=signals,
        requeue=requeue and dist.is_main,
        on_stalled=None if dist.active else on_stalled,
        before_exit=dist.barrier,
    )
    return Parts(dist, platform, uploader, writer, life)


#: The manager's constructor arguments :func:`assemble` takes (the manager passes them through by name).
SETTINGS = frozenset(inspect.signature(assemble).parameters) - {
    "directory",
    "best",
    "flush",
    "on_exit",
    "status",
    "on_stalled",
}
