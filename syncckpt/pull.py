"""Remote -> local: list candidates, pull one checkpoint with streaming verification, place it atomically.

Every remote object is treated as hostile until its manifest checks out: manifests are validated before use,
sizes are compared with the store before any byte is fetched, digests are computed while the bytes arrive, and
files land in a hidden ``.pull-*`` folder that becomes visible by rename only after everything verified.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _bars, local, quarantine  # _bars: plain tqdm bars (tqdm.auto warns in kernels without ipywidgets)
from ._memory import available_memory, holds_in_memory
from .errors import CheckpointCorrupt, RemoteError
from .manifest import LATEST_NAME, MANIFEST_NAME, Manifest, parse_checkpoint_name, same_content, sha256_hex
from .remote import Remote
from .select import Candidate

log = logging.getLogger("syncckpt")


@dataclass
class RemoteListing:
    """What a remote run holds, as resume, retention and the CLI see it.

    ``candidates``/``manifests``: checkpoints whose manifest parses and that are not quarantined.
    ``unreadable``: name -> (SHA-256 of the manifest's bytes or None, why it does not parse).
    ``quarantined``: checkpoints the run's quarantine index keeps aside. ``index``: that index as read.
    """

    candidates: list[Candidate] = field(default_factory=list)
    manifests: dict[str, Manifest] = field(default_factory=dict)
    unreadable: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    quarantined: list[quarantine.Quarantined] = field(default_factory=list)
    index: dict[str, dict[str, Any]] = field(default_factory=dict)
    listed: bool = True  # False: the store could not be listed (resume goes on with local checkpoints)


def remote_listing(remote: Remote, *, strict: bool = False, latest_expected: bool = True) -> RemoteListing:
    """List a remote run: every checkpoint whose manifest parses, minus the quarantined ones.

    The LATEST object is only a hint: when it is missing, stale or points at something that is not there the
    listing wins, and a warning names the problem. ``strict``: a store that cannot be listed raises instead of
    reading as an empty run (the CLI). ``latest_expected=False``: no warning when there is no LATEST at all (a
    training folder read as a store never has one; a stale or wrong one is still reported).
    """
    try:
        names = remote.list_checkpoints()
    except (OSError, RemoteError) as e:
        if strict:
            raise
        log.warning("Cannot list %s (%s); resuming from local checkpoints only", remote.url, e)
        return RemoteListing(listed=False)

    def read(name: str) -> tuple[str, Manifest | None, str | None, str | None]:
        try:
            m, data = remote.read_manifest(name)
            return name, m, sha256_hex(data), None
        except (CheckpointCorrupt, FileNotFoundError, OSError, RemoteError) as e:
            log.warning("Skipping remote checkpoint %s/%s: %s", remote.url, name, e)
            digest = None
            if isinstance(e, CheckpointCorrupt):
                try:  # the digest keys the quarantine index; an oversized object stays None
                    digest = sha256_hex(remote.read_bytes(f"{name}/manifest.json"))
                except (CheckpointCorrupt, FileNotFoundError, OSError, RemoteError):
                    pass
            return name, None, digest, str(e) if isinstance(e, CheckpointCorrupt) else None

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="syncckpt-list") as ex:
        found = list(ex.map(read, names))
    try:
        index = quarantine.read_index(remote)
    except (OSError, RemoteError) as e:
        log.warning(
            "Cannot read %s/%s (%s); no checkpoint is taken as quarantined", remote.url, quarantine.INDEX_NAME, e
        )
        index = {}
    out = RemoteListing(index=index)
    out.quarantined = quarantine.list_remote(index, remote.url, {n: d for n, _, d, _ in found})
    hidden = {q.name for q in out.quarantined}
    for n, m, digest, reason in found:
        if n in hidden:
            continue
        if m is None:
            if reason is not None:
                out.unreadable[n] = (digest, reason)
            continue
        out.candidates.append(Candidate(n, m.kind, m.global_step, m.epoch, "remote", digest or "", m.healthy))
        out.manifests[n] = m
    _check_latest(remote, out.candidates, hidden, latest_expected)
    return out


def _check_latest(remote: Remote, candidates: list[Candidate], hidden: set[str], expected: bool) -> None:
    """Warn when LATEST is missing (if ``expected``), stale or wrong (the listing wins); LATEST naming a
    quarantined checkpoint was reported when it was quarantined."""
    latest = remote.read_latest()
    if not candidates or (latest is not None and latest.name in hidden):
        return
    if latest is None:
        if expected or remote.exists(LATEST_NAME):  # a damaged one is always worth a word
            log.warning("%s/LATEST is missing or damaged; found checkpoints by listing", remote.url)
        return
    match = [c for c in candidates if c.name == latest.name]
    if not match:
        log.warning(
            "%s/LATEST points at %s, which is missing or incomplete; found checkpoints by listing",
            remote.url,
            latest.name,
        )
    elif match[0].manifest_sha256 != latest.manifest_sha256:
        log.warning(
            "%s/LATEST does not match the manifest of %s (wrong digest); trusting the manifest",
            remote.url,
            latest.name,
        )


def remote_candidates(remote: Remote) -> tuple[list[Candidate], dict[str, Manifest]]:
    """:func:`remote_listing`'s candidates and their manifests by name (quarantined checkpoints left out)."""
    listing = remote_listing(remote)
    return listing.candidates, listing.manifests


def pull(
    remote: Remote, name: str, directory: Path, manifest: Manifest | None = None, progress: bool = True
) -> tuple[Manifest, dict[str, bytes], Path]:
    """Download checkpoint ``name`` into ``directory/name``, verified while streaming; returns its bytes too."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        manifest, _ = remote.read_manifest(name)
    tmp = directory / f".pull-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with _bars.progress(
            total=manifest.total_size,
            unit="B",
            unit_scale=True,
            desc=f"pull {name}",
            disable=not progress or None,
            leave=False,
        ) as bar:
            # Loaded next: kept in memory as it is written, so nothing is read back from the file.
            keep = holds_in_memory(manifest.total_size, available_memory())
            kept = remote.download_checkpoint(name, manifest, tmp, progress=bar.update, keep=keep)
        # Locally a checkpoint is plain files: drop the remote's blob layout from the manifest kept on disk.
        local_manifest = dataclasses.replace(
            manifest, files=[dataclasses.replace(e, parts=None) for e in manifest.files]
        )
        local.write_file(tmp, "manifest.json", [local_manifest.to_bytes()])
        files = {  # verified while downloading
            e.path: _loadable(e.path, kept[e.path]) if keep else local.read_file(tmp / e.path) for e in manifest.files
        }
        local.fsync_dir(tmp)
        final = directory / name
        old = None
        if final.exists():
            old = directory / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        local.fsync_dir(directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "Pulled %s from %s (%d files, %d bytes, digests verified)",
        name,
        remote.url,
        len(manifest.files),
        manifest.total_size,
    )
    return local_manifest, files, final


def _loadable(rel: str, buf: Any) -> Any:
    """A kept download in the form :func:`local.read_file` gives it (see :func:`local.loads_as_views`)."""
    return buf if local.loads_as_views(rel, len(buf)) else bytearray(buf)


def pull_or_reuse(
    remote: Remote, name: str, directory: Path, manifest: Manifest | None = None
) -> tuple[Manifest, dict[str, bytes], Path, bool]:
    """:func:`pull`, unless ``directory/name`` already holds the same checkpoint and it verifies (a second
    ``syncckpt pull``, a resume from a run URL pulled before): then nothing is downloaded. Returns what
    :func:`pull` does, and whether it downloaded."""
    existing = Path(directory) / name
    if manifest is not None and (existing / MANIFEST_NAME).exists():
        try:
            mine, _ = local.read_manifest(existing)
            if same_content(mine, manifest):
                return (*local.verify(existing), existing, False)
        except CheckpointCorrupt as e:
            log.info("Replacing %s: %s", existing, e)
    return (*pull(remote, name, directory, manifest), True)


def split_checkpoint_url(url: str) -> tuple[str, str | None]:
    """``s3://b/run/checkpoint-step-5`` -> (``s3://b/run``, ``checkpoint-step-5``); a run URL -> (url, None).

    >>> split_checkpoint_url("s3://b/run/checkpoint-step-5/")
    ('s3://b/run', 'checkpoint-step-5')
    >>> split_checkpoint_url("gs://b/run")
    ('gs://b/run', None)
    """
    stripped = url.rstrip("/")
    head, _, last = stripped.rpartition("/")
    if parse_checkpoint_name(last) is not None and "://" in head + "/":
        return head, last
    return stripped, None
