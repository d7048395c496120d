"""The Trainer's ``checkpoint-N`` folders on the remote: which ones it keeps, which one a new session resumes.

:func:`place_manifest` puts a mirrored checkpoint's manifest next to the Trainer's files without upsetting its
rotation; :func:`plan_rotation` is the remote's retention, mirroring the Trainer's own ``rotate_checkpoints``;
:func:`resume_checkpoint` is the path for ``trainer.train(resume_from_checkpoint=...)``, found by the core's one
candidate search (:func:`syncckpt.resume.find_resumable`). The last two are re-exported by
:mod:`syncckpt.integrations.transformers`, their public home.

>>> is_trainer_checkpoint("checkpoint-500"), is_trainer_checkpoint("checkpoint-step-500")
(True, False)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import local
from ..errors import NoValidCheckpoint
from ..manifest import MANIFEST_NAME
from ..pull import split_checkpoint_url
from ..remote import open_remote
from ..resume import find_resumable, pull_checkpoint_url
from ..retention import Ref, plan_deletions, recency

log = logging.getLogger("syncckpt")

__all__ = ["plan_rotation", "resume_checkpoint"]

_TRAINER_NAME = re.compile(r"^checkpoint-\d+$")


def is_trainer_checkpoint(name: str) -> bool:
    return bool(_TRAINER_NAME.match(name))


def plan_rotation(refs: Iterable[Ref], save_total_limit: int | None, best_name: str | None = None) -> list[str]:
    """Remote checkpoints to delete so the remote keeps what the Trainer's ``rotate_checkpoints`` keeps locally.

    The Trainer keeps at most ``save_total_limit`` ``checkpoint-N`` folders, always including the newest one and
    the best model's (``state.best_model_checkpoint``), which counts towards the limit. Other names (syncckpt's own
    ``checkpoint-step-N``, ...) are never touched. Pure: plain data in, names out.

    >>> refs = [Ref(f"checkpoint-{n}", "step", n, 0) for n in (2, 4, 6, 8)]
    >>> plan_rotation(refs, 2), plan_rotation(refs, 2, best_name="checkpoint-2")
    (['checkpoint-2', 'checkpoint-4'], ['checkpoint-4', 'checkpoint-6'])
    >>> plan_rotation(refs, 1, best_name="checkpoint-4"), plan_rotation(refs, None)
    (['checkpoint-2', 'checkpoint-6'], [])
    """
    if not save_total_limit or save_total_limit <= 0:
        return []
    steps = [r for r in refs if r.kind == "step" and is_trainer_checkpoint(r.name)]
    newest = {r.name for r in sorted(steps, key=recency, reverse=True)[:save_total_limit]}
    keep = save_total_limit
    best_is_old = best_name is not None and best_name not in newest and any(r.name == best_name for r in steps)
    if best_is_old:
        keep = max(save_total_limit - 1, 1)  # best counts towards the limit; the newest is always kept
    return plan_deletions(steps, keep, 0, protected={best_name} if best_is_old else ())


def place_manifest(folder: Path, data: bytes) -> None:
    """Write manifest.json next to the Trainer's files, keeping the folder's mtime: the Trainer's rotation orders
    checkpoints by mtime, and a late manifest must not make an old folder look newest."""
    try:
        st = os.stat(folder)
        local.write_file(folder, MANIFEST_NAME, [data])
        os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns))
    except OSError as e:  # the Trainer rotated the folder away meanwhile: the remote copy is what matters
        log.debug("Could not place %s in %s: %s", MANIFEST_NAME, folder, e)


def resume_checkpoint(
    remote: str, output_dir: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> str | None:
    """The ``checkpoint-N`` folder to pass to ``trainer.train(resume_from_checkpoint=...)``, or None.

    Candidates are the local ``output_dir/checkpoint-N`` folders that carry a syncckpt manifest and the remote's
    ``checkpoint-N`` checkpoints. The newest wins, a local copy on ties (nothing is downloaded then); each is
    verified (every file against its SHA-256) before it is returned, and a damaged one is skipped for the next.
    A remote one is pulled into ``output_dir`` first. ``remote`` may also name one checkpoint
    (``s3://b/run/checkpoint-500``): that one is pulled. An unreachable remote falls back to local checkpoints.

    >>> import tempfile
    >>> print(resume_checkpoint("memory://doc-resume/run", tempfile.mkdtemp()))
    None
    """
    out = Path(output_dir)
    run_url, name = split_checkpoint_url(remote)
    if name is not None:
        _, _, path = pull_checkpoint_url(remote, out, storage_options)
        log.info("Resuming from checkpoint: %s", path)
        return str(path)
    store = open_remote(run_url, storage_options)
    try:
        search = find_resumable(out, store, accept=is_trainer_checkpoint)
    finally:
        store.close()
    if search.found is not None:
        f = search.found
        log.info(
            "Resuming from checkpoint: %s (global step %d, %s)",
            f.path,
            f.manifest.global_step,
            "local" if f.source == "local" else f"pulled from {store.url}",
        )
        return str(f.path)
    if search.nothing_valid:
        log.warning("No valid checkpoint-N in %s or %s: %s", out, store.url, search.damage_report())
        raise NoValidCheckpoint(
            f"no checkpoint-N in {out} or {store.url} verified (they are quarantined); see the warnings above"
        )
    log.info("No checkpoint found in %s or %s; training starts from scratch", out, store.url)
    return None
