"""find_resumable(): the one search for the checkpoint to resume from, local and remote, verified, with fallback.

Every front end that resumes asks this module: :class:`~syncckpt.CheckpointManager`, the transformers
integration's ``resume_checkpoint`` and :func:`pull_checkpoint_url`. Candidates come from the local folder and the
remote run (quarantined ones are out of both listings), in :func:`syncckpt.select.order_candidates` order. Each is
verified (local: every file against its SHA-256; remote: pulled with digests checked while streaming) and, when
the caller gives one, decoded; the first that passes wins. One that fails is skipped with a warning and, where
the caller owns the folder and the run, quarantined (see :mod:`syncckpt.quarantine`), so it never steers
retention, ``--resume-from`` or prune afterwards.

>>> import tempfile, pathlib
>>> from syncckpt import local
>>> from syncckpt.manifest import Manifest
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> for step in (5, 10):
...     _ = local.commit(d, Manifest(f"checkpoint-step-{step}", "step", step, 0, step - 1, files=[]),
...                      lambda tmp: [local.write_file(tmp, "a.json", [b"{}"])])
>>> (d / "checkpoint-step-10" / "a.json").write_bytes(b"[]")  # damaged: same size, other bytes
2
>>> search = find_resumable(d)
>>> search.found.candidate.name, [(x.name, x.quarantined) for x in search.damaged]
('checkpoint-step-5', [('checkpoint-step-10', True)])
>>> sorted(p.name.split("-2")[0] for p in d.iterdir())
['.quarantine-checkpoint-step-10', 'checkpoint-step-5']
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from . import local, quarantine
from ._failpoints import failpoint
from .errors import CheckpointCorrupt, CheckpointNotFound, RemoteError
from .manifest import LATEST_NAME, Latest, Manifest
from .pull import RemoteListing, pull, pull_or_reuse, remote_listing, split_checkpoint_url
from .remote import Remote, open_remote
from .select import Candidate, order_candidates

log = logging.getLogger("syncckpt")

Decode = Callable[[Manifest, dict[str, bytes], Path], Any]
T = TypeVar("T")


@dataclass(frozen=True)
class Damaged:
    """A checkpoint that failed verification (or whose manifest does not parse), and why."""

    name: str
    location: str  # "local" or "remote"
    where: str
    reason: str
    quarantined: bool = False


@dataclass
class Found:
    """The checkpoint to resume from: verified, its files' bytes, the local folder it is in, where it came from."""

    candidate: Candidate
    manifest: Manifest
    files: dict[str, bytes]
    path: Path
    source: str  # "local" or the remote run's URL
    decoded: Any = None
    downloaded: bool = False  # pulled from the remote now (False: found in place)


@dataclass
class Search:
    """What :func:`find_resumable` saw: the winner (or None), what failed now, what was quarantined before."""

    found: Found | None
    damaged: list[Damaged] = field(default_factory=list)
    quarantined: list[quarantine.Quarantined] = field(default_factory=list)

    @property
    def nothing_valid(self) -> bool:
        """Checkpoints exist, but none verifies: starting from scratch beside them needs the user's say-so."""
        return self.found is None and bool(self.damaged or self.quarantined)

    def damage_report(self) -> str:
        """One line naming every damaged or quarantined checkpoint and its reason."""
        seen = [f"{d.name} ({d.location}): {d.reason}" for d in self.damaged]
        now = {(d.name, d.location) for d in self.damaged}
        seen += [
            f"{q.name} ({q.location}, quarantined earlier): {q.reason}"
            for q in self.quarantined
            if (q.name, q.location) not in now
        ]
        return "; ".join(seen)


def find_resumable(
    directory: Path,
    remote: Remote | None = None,
    *,
    listing: RemoteListing | None = None,
    accept: Callable[[str], bool] | None = None,
    decode: Decode | None = None,
    quarantine_damaged: bool = True,
    include_local: bool = True,
    inputs: Iterable[Path] = (),
) -> Search:
    """Find, verify (and ``decode``) the newest valid checkpoint in ``directory`` and ``remote``.

    ``listing``: the remote's listing when the caller already has one. ``accept``: which checkpoint names count
    (the transformers integration takes only ``checkpoint-N``). ``decode(manifest, files, path)`` may raise
    CheckpointCorrupt for content that passed its digests but is not what it claims. ``quarantine_damaged``:
    move failed checkpoints aside (only for a folder and run the caller owns; never for a read-only input).
    ``include_local``: False to consider the remote's checkpoints only. A remote candidate that wins is pulled
    into ``directory``. ``inputs``: read-only folders of checkpoints (a Kaggle Dataset under ``/kaggle/input``)
    that are one more source: verified in place and loaded from there, never written to or quarantined.
    """
    directory = Path(directory)
    ok = accept or (lambda name: True)
    checkpoints, unreadable = local.scan(directory) if include_local else ([], {})
    cands = [_local_candidate(c) for c in checkpoints if ok(c.name)]
    damaged = [Damaged(n, "local", str(directory / n), r) for n, r in unreadable.items() if ok(n)]
    quarantined = [q for q in quarantine.list_local(directory) if ok(q.name)] if include_local else []
    for folder in inputs:
        found, bad = local.scan(Path(folder))
        cands += [_local_candidate(c, folder) for c in found if ok(c.name)]
        damaged += [Damaged(n, "input", str(Path(folder) / n), r) for n, r in bad.items() if ok(n)]
    if remote is not None:
        listing = listing if listing is not None else remote_listing(remote)
        cands += [c for c in listing.candidates if ok(c.name)]
        damaged += [Damaged(n, "remote", f"{remote.url}/{n}", r) for n, (_, r) in listing.unreadable.items() if ok(n)]
        quarantined += [q for q in listing.quarantined if ok(q.name)]
    ordered = order_candidates(cands)
    if ordered and not ordered[0].healthy:
        log.warning("No healthy checkpoint found; trying unhealthy ones (non-finite weights)")

    def failed(c: Candidate, reason: str) -> None:
        done = quarantine_damaged and c.location != "input" and _quarantine(c, reason, directory, remote, listing)
        damaged.append(Damaged(c.name, c.location, _where(c, directory, remote), reason, done))

    won = first_valid(ordered, lambda c: _load(c, directory, remote, listing, decode), failed)
    if won is None:
        return Search(None, damaged, quarantined)
    c, found = won
    if c.healthy and any(not x.healthy and x.global_step > c.global_step for x in cands):
        log.warning("Resuming from %s, the newest healthy checkpoint; newer ones hold non-finite weights", c.name)
    return Search(found, damaged, quarantined)


def first_valid(
    ordered: Iterable[Candidate], load: Callable[[Candidate], T], failed: Callable[[Candidate, str], None]
) -> tuple[Candidate, T] | None:
    """The one candidate loop: ``load`` each candidate in order (it verifies, and raises CheckpointCorrupt when
    the checkpoint is damaged) until one passes. A damaged one is logged and handed to ``failed``; one that
    vanished meanwhile (FileNotFoundError: another session's retention) is only skipped."""
    for c in ordered:
        try:
            return c, load(c)
        except FileNotFoundError as e:
            log.warning("Skipping checkpoint %s (%s): %s", c.name, c.location, e)
        except CheckpointCorrupt as e:
            log.warning("Skipping checkpoint %s (%s): %s", c.name, c.location, e)
            failed(c, str(e))
    return None


def pull_checkpoint_url(
    url: str,
    directory: Path,
    storage_options: dict[str, Any] | None = None,
) -> tuple[Manifest, dict[str, bytes], Path]:
    """Resolve a remote checkpoint URL (or a run URL: its newest valid checkpoint) and pull it into ``directory``.
    The URL names someone's run, maybe not ours: nothing is written to it (no quarantine)."""
    run_url, name = split_checkpoint_url(url)
    remote = open_remote(run_url, storage_options)
    try:
        if name is not None:
            try:
                return pull(remote, name, directory)
            except (CheckpointCorrupt, FileNotFoundError) as e:
                raise CheckpointNotFound(f"{url}: no valid checkpoint there ({e})") from None
        search = find_resumable(directory, remote, include_local=False, quarantine_damaged=False)
    finally:
        remote.close()
    if search.found is None:
        detail = f" ({search.damage_report()})" if search.damaged else ""
        raise CheckpointNotFound(f"{url}: no valid checkpoint there{detail}")
    return search.found.manifest, search.found.files, search.found.path


def newer_valid(
    directory: Path,
    remote: Remote | None,
    than: Manifest,
    *,
    quarantine_damaged: bool = True,
) -> list[str]:
    """Where a checkpoint at a higher global step than ``than`` verifies: ``["<folder or URL>: <name>"]``, the
    newest valid one per place (empty when none). Damaged newer ones are skipped (and quarantined), so they
    never block going back to an older checkpoint. Remote ones are downloaded into a temporary folder to be
    checked, newest first, stopping at the first that passes."""
    directory = Path(directory)
    out = []
    local_cands = local_candidates(directory)
    sources: list[tuple[list[Candidate], Remote | None, RemoteListing | None]] = [(local_cands, None, None)]
    if remote is not None:
        listing = remote_listing(remote)
        sources.append((listing.candidates, remote, listing))
    for cands, store, listing in sources:

        def check(c: Candidate, store: Remote | None = store, listing: RemoteListing | None = listing) -> None:
            if store is None:
                local.verify(directory / c.name)
                return
            with tempfile.TemporaryDirectory(dir=directory, prefix=".pull-verify-") as tmp:
                store.download_checkpoint(c.name, listing.manifests[c.name], Path(tmp))  # type: ignore[union-attr]

        def failed(c: Candidate, reason: str, store: Remote | None = store, listing: RemoteListing | None = listing):
            if quarantine_damaged:
                _quarantine(c, reason, directory, store, listing)

        newer = order_candidates(x for x in cands if x.global_step > than.global_step and x.name != than.name)
        won = first_valid(newer, check, failed)
        if won is not None:
            # the ones ordered after it (not verified); those before it failed and were quarantined
            others = [c.name for c in newer[newer.index(won[0]) + 1 :]]
            also = f" (newer there too: {', '.join(others)})" if others else ""
            out.append(f"{directory if store is None else store.url}: {won[0].name}{also}")
    return out


def local_candidates(directory: Path) -> list[Candidate]:
    """The committed checkpoints of ``directory`` as resume candidates (unverified; order them with
    :func:`~syncckpt.select.order_candidates`)."""
    return [_local_candidate(c) for c in local.list_checkpoints(Path(directory))]


def _local_candidate(c: local.LocalCheckpoint, input_folder: Path | None = None) -> Candidate:
    m = c.manifest
    where = ("local", "") if input_folder is None else ("input", str(input_folder))
    return Candidate(c.name, m.kind, m.global_step, m.epoch, where[0], c.manifest_sha256, m.healthy, where[1])


def _where(c: Candidate, directory: Path, remote: Remote | None) -> str:
    if c.location == "remote":
        return f"{remote.url}/{c.name}"  # type: ignore[union-attr]
    return str(Path(c.folder or directory) / c.name)


def _load(
    c: Candidate, directory: Path, remote: Remote | None, listing: RemoteListing | None, decode: Decode | None
) -> Found:
    if c.location in ("local", "input"):
        path, source, downloaded = Path(c.folder or directory) / c.name, c.location, False
        manifest, files = local.verify(path)
    else:
        assert remote is not None and listing is not None
        manifest, files, path, downloaded = pull_or_reuse(remote, c.name, directory, listing.manifests.get(c.name))
        source = remote.url
    decoded = decode(manifest, files, path) if decode is not None else None
    return Found(c, manifest, files, path, source, decoded, downloaded=downloaded)


def _quarantine(
    c: Candidate, reason: str, directory: Path, remote: Remote | None, listing: RemoteListing | None
) -> bool:
    """Quarantine a candidate that failed; True when done. Never raises: the search goes on either way."""
    if c.location == "local":
        try:
            _, digest = local.read_manifest(directory / c.name)
        except CheckpointCorrupt:
            digest = None
        if digest != c.manifest_sha256:  # replaced since it was listed (a new commit of that name): not ours
            return False
        q = quarantine.quarantine_local(directory, c.name, reason)
        if q is not None:
            log.warning(
                "Quarantined %s: kept as %s; it is never resumed from or counted by retention (delete it with "
                "`syncckpt rm %s`)",
                c.name,
                q.where,
                directory / c.name,
            )
        return q is not None
    assert remote is not None
    try:
        failpoint("quarantine-index")
        quarantine.quarantine_remote(remote, c.name, c.manifest_sha256, reason)
        failpoint("quarantine-latest")
        repoint_latest(remote, c.name, listing.candidates if listing else [])
    except (OSError, RemoteError) as e:
        log.warning("Could not quarantine %s/%s (%s); it is skipped at every resume until fixed", remote.url, c.name, e)
        return False
    if listing is not None:
        listing.candidates = [x for x in listing.candidates if x.name != c.name]
    log.warning(
        "Quarantined %s/%s (listed in %s/%s); it is never resumed from or counted by retention (delete it "
        "with `syncckpt rm %s/%s`)",
        remote.url,
        c.name,
        remote.url,
        quarantine.INDEX_NAME,
        remote.url,
        c.name,
    )
    return True


def repoint_latest(remote: Remote, removed: str | set[str], remaining: list[Candidate]) -> None:
    """After ``removed`` left the run (quarantined or deleted), a LATEST naming it points at the newest remaining
    checkpoint instead, or is deleted when none remains. LATEST naming another checkpoint is left alone."""
    gone = {removed} if isinstance(removed, str) else removed
    latest = remote.read_latest()
    if latest is None or latest.name not in gone:
        return
    newest = order_candidates(c for c in remaining if c.name not in gone)  # healthy ones first
    if newest:
        top = newest[0]
        remote.write_bytes(LATEST_NAME, Latest(top.name, top.global_step, top.manifest_sha256).to_bytes())
    else:
        remote.delete(LATEST_NAME)
