"""Check every checkpoint in a local folder and in a remote run, the way an auditor would: all of them, fully.

A folder or remote prefix that carries a manifest claims to be a complete checkpoint; after any crash each such
claim must hold (every file present with its size and SHA-256). Hidden leftovers of an interrupted save
(``.tmp-*``, ``.upload-*``, ...) and remote prefixes without a manifest are not checkpoints and are not judged.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from syncckpt import local
from syncckpt.errors import SyncCkptError
from syncckpt.manifest import parse_checkpoint_name
from syncckpt.remote import Remote, open_remote


@dataclass
class Audit:
    """Valid checkpoints by name (their global step) and what was wrong with the others."""

    valid: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    latest: str | None = None
    latest_dangling: bool = False

    @property
    def newest_step(self) -> int:
        return max(self.valid.values(), default=0)  # steps start at 1: 0 means none


def audit_local(directory: Path) -> Audit:
    """Verify every visible checkpoint folder of ``directory`` (a folder named like a checkpoint is one)."""
    audit = Audit()
    directory = Path(directory)
    if not directory.is_dir():
        return audit
    for p in sorted(directory.iterdir()):
        if not p.is_dir() or parse_checkpoint_name(p.name) is None:
            continue
        try:
            manifest, _ = local.verify(p)
        except SyncCkptError as e:
            audit.problems.append(f"local {p.name}: {e}")
            continue
        audit.valid[p.name] = manifest.global_step
    return audit


def audit_remote(remote: Remote | str, scratch: Path, storage_options: dict[str, Any] | None = None) -> Audit:
    """Download and verify every remote checkpoint that has a manifest; note where LATEST points.

    ``remote`` is a run URL or an open :class:`Remote` (reused across audits: no client start-up each time).
    """
    if isinstance(remote, str):
        remote = open_remote(remote, storage_options)
    audit = Audit()
    for name in remote.list_checkpoints():
        dest = Path(scratch) / f"audit-{uuid.uuid4().hex[:8]}"
        try:
            manifest, _ = remote.read_manifest(name)
            remote.download_checkpoint(name, manifest, dest)
        except (SyncCkptError, OSError) as e:
            audit.problems.append(f"remote {name}: {type(e).__name__}: {e}")
            continue
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        audit.valid[name] = manifest.global_step
    latest = remote.read_latest()
    if latest is not None:
        audit.latest = latest.name
        audit.latest_dangling = latest.name not in audit.valid
    return audit


def listing(root: Path, exclude: Path | None = None) -> dict[str, int]:
    """Every path under ``root`` (relative) with its size, leaving out the tree under ``exclude``."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if exclude is not None and (p == exclude or exclude in p.parents):
            continue
        out[p.relative_to(root).as_posix()] = p.stat().st_size if p.is_file() else -1
    return out
