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
from pathlib import Path
from typing import Any

from tqdm import tqdm  # plain bars: tqdm.auto warns in kernels without ipywidgets

from . import local
from .errors import CheckpointCorrupt, CheckpointNotFound, RemoteError
from .manifest import Manifest, parse_checkpoint_name, sha256_hex
from .remote import Remote, open_remote
from .select import Candidate

log = logging.getLogger("syncckpt")


def remote_candidates(remote: Remote) -> tuple[list[Candidate], dict[str, Manifest]]:
    """Every remote checkpoint whose manifest parses, as selection candidates (plus the manifests by name).

    The LATEST object is only a hint: when it is missing, stale or points at something that is not there the
    listing wins, and a warning names the problem.
    """
    try:
        names = remote.list_checkpoints()
    except (OSError, RemoteError) as e:
        log.warning("Cannot list %s (%s); resuming from local checkpoints only", remote.url, e)
        return [], {}

    def read(name: str) -> tuple[str, Manifest, bytes] | None:
        try:
            m, data = remote.read_manifest(name)
            return name, m, data
        except (CheckpointCorrupt, FileNotFoundError, OSError, RemoteError) as e:
            log.warning("Skipping remote checkpoint %s/%s: %s", remote.url, name, e)
            return None

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="syncckpt-list") as ex:
        found = [r for r in ex.map(read, names) if r is not None]
    cands = [Candidate(n, m.kind, m.global_step, m.epoch, "remote", sha256_hex(d), m.healthy) for n, m, d in found]
    manifests = {n: m for n, m, _ in found}
    latest = remote.read_latest()
    if found:
        if latest is None:
            log.warning("%s/LATEST is missing or damaged; found checkpoints by listing", remote.url)
        else:
            match = [c for c in cands if c.name == latest.name]
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
    return cands, manifests


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
        with tqdm(
            total=manifest.total_size,
            unit="B",
            unit_scale=True,
            desc=f"pull {name}",
            disable=not progress or None,
            leave=False,
        ) as bar:
            remote.download_checkpoint(name, manifest, tmp, progress=bar.update)
        # Locally a checkpoint is plain files: drop the remote's blob layout from the manifest kept on disk.
        local_manifest = dataclasses.replace(
            manifest, files=[dataclasses.replace(e, parts=None) for e in manifest.files]
        )
        local.write_file(tmp, "manifest.json", [local_manifest.to_bytes()])
        files = {e.path: (tmp / e.path).read_bytes() for e in manifest.files}  # verified while downloading
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


def pull_checkpoint_url(
    url: str,
    directory: Path,
    storage_options: dict[str, Any] | None = None,
) -> tuple[Manifest, dict[str, bytes], Path]:
    """Resolve a remote checkpoint URL (or a run URL: its newest valid checkpoint) and pull it."""
    run_url, name = split_checkpoint_url(url)
    remote = open_remote(run_url, storage_options)
    try:
        if name is not None:
            try:
                return pull(remote, name, directory)
            except (CheckpointCorrupt, FileNotFoundError) as e:
                raise CheckpointNotFound(f"{url}: no valid checkpoint there ({e})") from None
        cands, manifests = remote_candidates(remote)
        from .select import order_candidates

        for c in order_candidates(cands):
            try:
                return pull(remote, c.name, directory, manifests[c.name])
            except CheckpointCorrupt as e:
                log.warning("Skipping remote checkpoint %s: %s", c.name, e)
        raise CheckpointNotFound(f"{url}: no valid checkpoint there")
    finally:
        remote.close()
