"""Cluster jobs without a shared file system: every node writes, keeps and mirrors its own part of a checkpoint.

On spot VMs, GKE or SkyPilot each node has its own local disk. :func:`private_directories` finds out at start
(every rank looks for a marker file the first rank of its node and rank 0 wrote) whether the ranks share rank
0's checkpoint folder; when they do not, the job runs node-local:

- **Write.** Every rank writes its files into its own node's folder; the ranks gather their file entries (JSON
  over the writer's process group) and each node's first rank commits that node's part locally
  (:func:`node_part`): a normal checkpoint folder whose manifest lists only the node's files, with the job's
  ``save_id`` and which rank wrote which file (``extra["ranks"]``).
- **Mirror.** Each node's first rank runs an uploader (:class:`NodeMirror`): it sends its part's files to
  ``NAME/`` in the run, checks them in the store, then writes ``NAME/parts/node-K.json`` (its entries and
  digests). The coordinator (global rank 0, the only one holding the run's lease) waits for every node's part of
  the same save, then writes ``NAME/manifest.json`` listing every file with its digest, then LATEST, then
  retention's deletions. A node that dies before its part landed leaves the checkpoint uncommitted: the previous
  one stays the newest, and retention deletes nothing older meanwhile. The coordinator never reads another
  node's disk.
- **Resume** (:func:`resume_nodes`). Rank 0 picks the checkpoint with :func:`syncckpt.resume.find_resumable`
  among the run's committed checkpoints (its own local part, verified, or the files it needs, pulled) and
  broadcasts it; every other node pulls only the files its ranks need (rank 0's replicated state and its own
  ranks' files), verified while streaming.

Sharded (FSDP2/DTensor) state goes the same way: every rank writes its DCP shard into its node's folder, rank 0
writes the DCP index (``dcp/index.json``) into node 0's, so the index is in node 0's part and each shard in its
writer's node's part. On resume a node pulls the index and only its own ranks' shards:

>>> from syncckpt.manifest import Manifest, FileEntry
>>> shard = [f"dcp/shard-0000{r}-of-00004.safetensors" for r in range(4)]
>>> ranks = {"0": ["model.safetensors", shard[0], "dcp/index.json"], "2": [shard[2], "rng-rank2.safetensors"],
...          "3": [shard[3], "rng-rank3.safetensors"]}
>>> m = Manifest("checkpoint-step-4", "step", 4, 0, 3, world_size=4, extra={"ranks": ranks},
...              files=[FileEntry(p, 1, "0" * 64) for p in sorted({p for ps in ranks.values() for p in ps})])
>>> [f.path for f in needed_files(m, [2])]
['dcp/index.json', 'dcp/shard-00002-of-00004.safetensors', 'model.safetensors', 'rng-rank2.safetensors']
>>> len(needed_files(m, [0], world_size=1))  # another world size reshards: every shard, no other rank's RNG
5
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from . import local
from ._failpoints import failpoint
from .errors import CheckpointCorrupt, ConfigError, NoValidCheckpoint, RemoteError, SyncCkptError
from .format import decode_checkpoint
from .manifest import MANIFEST_NAME, FileEntry, Manifest, check_relative_path
from .pull import pull, remote_listing
from .remote import Remote
from .remote.run import Published, RemoteRun
from .restore import Resumed, _resume_info, restore
from .resume import find_resumable
from .sharded import is_shard_file

log = logging.getLogger("syncckpt")

__all__ = ["NodeMirror", "needed_files", "node_part", "private_directories", "resume_nodes"]

PARTS_DIR = "parts"
_MARKER = ".syncckpt-node-"
#: ``SYNCCKPT_NODE_LOCAL=1`` (or ``0``): fail at start unless the detection finds private (or shared) folders.
ENV_NODE_LOCAL = "SYNCCKPT_NODE_LOCAL"


def private_directories(directory: Path, dist: Any, token: str) -> bool:
    """Whether each node keeps its own checkpoint folder (True) or every rank sees rank 0's (False); collective.

    The first rank of every node writes ``.syncckpt-node-TOKEN-K`` into its folder; every rank then looks for
    its own node's marker (a rank that misses it uses another folder than its node: refused) and for node 0's."""
    own = directory / f"{_MARKER}{token}-{dist.node}"
    if dist.local_rank == 0:
        with open(own, "wb") as f:
            os.fsync(f.fileno())
        local.fsync_dir(directory)
    dist.barrier()
    seen = dist.gather_json([own.exists(), (directory / f"{_MARKER}{token}-0").exists()], group=dist.step_group)
    if dist.local_rank == 0:  # every rank has looked: the all-gather returned; a killed start's markers go too
        for stale in directory.glob(f"{_MARKER}*"):
            if stale == own or not stale.name.startswith(f"{_MARKER}{token}-"):
                stale.unlink(missing_ok=True)
    lost = [r for r, (mine, _) in enumerate(seen) if not mine]
    if lost:
        raise ConfigError(
            f"ranks {lost} do not see the checkpoint directory of the first rank on their node: "
            "the ranks of one node must share one checkpoint directory"
        )
    private = not all(zero for _, zero in seen)
    wanted = os.environ.get(ENV_NODE_LOCAL, "")
    if wanted in ("0", "1") and (wanted == "1") != private:
        found = "a node does not see rank 0's checkpoint directory" if private else "every node sees rank 0's"
        raise ConfigError(f"{ENV_NODE_LOCAL}={wanted}, but {found}")
    if private and dist.is_main:
        log.info(
            "Checkpoint directories are node-local (%d nodes): each node writes and mirrors its own part", dist.nodes
        )
    return private


def node_part(dist: Any, job: Any, reports: list[dict[str, Any]], save_id: str) -> list[FileEntry]:
    """This node's entries among every rank's ``reports`` (rank order); records on each of ``job.commits`` the
    save's id and which rank wrote which file, which resume needs to pull only a node's own files."""
    mine = set(dist.node_ranks)
    entries = [
        FileEntry(f["path"], f["size"], f["sha256"], crc32c=f.get("crc32c"))
        for rank, rep in enumerate(reports)
        if rank in mine
        for f in rep["files"]
    ]
    ranks = {str(r): [f["path"] for f in rep["files"]] for r, rep in enumerate(reports)}
    for m in job.commits:
        m.extra.update(save_id=save_id, node=dist.node, nodes=dist.nodes, ranks=ranks)
    return entries


def needed_files(manifest: Manifest, ranks: list[int], world_size: int | None = None) -> list[FileEntry]:
    """The files ``ranks`` (one node's) need to resume: rank 0's replicated state (its DCP shard is rank 0's own,
    the DCP index is every rank's) and their own files (RNG, DCP shards). In a job of another ``world_size`` than
    the checkpoint's, DCP reshards and may read any rank's shard: every shard is needed. All files when the
    manifest does not say which rank wrote which (a checkpoint of a shared-directory run)."""
    by_rank = manifest.extra.get("ranks")
    if not isinstance(by_rank, dict):
        return list(manifest.files)

    def written_by(rank: int) -> list[str]:  # the remote's word: anything but a list of paths names nothing
        paths = by_rank.get(str(rank))
        return [p for p in paths if isinstance(p, str)] if isinstance(paths, list) else []

    reshard = world_size is not None and world_size != manifest.world_size
    keep = {p for r in ranks for p in written_by(r)}
    keep.update(p for p in written_by(0) if not is_shard_file(p))
    return [f for f in manifest.files if f.path in keep or (reshard and is_shard_file(f.path))]


def _part_rel(name: str, node: int) -> str:
    return f"{name}/{PARTS_DIR}/node-{node}.json"


class NodeMirror:
    """Mirrors one node's parts (every node's first rank has one; the uploader's thread calls it). The
    coordinator's ``run`` holds the lease and commits; the other nodes only add their parts. ``part_timeout``:
    how long the coordinator waits for the other nodes' parts before the upload fails (and is retried)."""

    def __init__(
        self, remote: Remote, node: int, nodes: int, run: RemoteRun | None = None, part_timeout: float = 600.0
    ) -> None:
        if type(remote).commit_checkpoint is not Remote.commit_checkpoint:
            raise ConfigError(f"{remote.url}: node-local checkpoints need a store written file by file (fsspec)")
        self.remote, self.node, self.nodes, self.run = remote, node, nodes, run
        self.part_timeout = part_timeout
        self._sent: set[str] = set()  # save ids whose part is in the store (a retried commit does not resend it)
        self._stop = threading.Event()

    def stop(self) -> None:
        """Stop waiting for other nodes' parts (the uploader is closing)."""
        self._stop.set()

    def publish(self, staging: Path) -> Published:
        """Send this node's part from ``staging``; on the coordinator, then commit the whole checkpoint."""
        manifest = Manifest.from_bytes((staging / MANIFEST_NAME).read_bytes())
        save_id = str(manifest.extra.get("save_id"))
        sent = 0
        if save_id not in self._sent:
            sent = self._send_part(staging, manifest)
            self._sent.add(save_id)
        if self.run is None:
            return Published(manifest, sent, [])
        full = self._assemble(manifest)
        done = self.run.publish_assembled(full)
        return dataclasses.replace(done, sent=done.sent + sent)

    def _send_part(self, staging: Path, manifest: Manifest) -> int:
        name, remote = manifest.name, self.remote
        remote.delete(f"{name}/{MANIFEST_NAME}")  # an older save of this name stops counting as committed
        remote._parallel(lambda e: remote._upload(staging / e.path, f"{name}/{e.path}", e.size), manifest.files)
        remote.check_uploaded(name, manifest)
        failpoint("remote-data")
        part = {
            "node": self.node,
            "save_id": manifest.extra.get("save_id"),
            "files": [e.to_dict() for e in manifest.files],
        }
        data = json.dumps(part, sort_keys=True).encode()
        remote.write_bytes(_part_rel(name, self.node), data)
        log.info("Node %d's part of %s is in %s (%d files, verified)", self.node, name, remote.url, len(manifest.files))
        return manifest.total_size + len(data)

    def _assemble(self, manifest: Manifest) -> Manifest:
        """The checkpoint's manifest once every node's part of this save is in the store."""
        files = {e.path: e for e in manifest.files}
        for node in range(self.nodes):
            if node == self.node:
                continue
            for entry in self._await_part(manifest, node):
                if entry.path in files:
                    raise RemoteError(f"{manifest.name}: {entry.path} is in two nodes' parts")
                files[entry.path] = entry
        extra = {k: v for k, v in manifest.extra.items() if k != "node"}
        return dataclasses.replace(manifest, files=sorted(files.values(), key=lambda e: e.path), extra=extra)

    def _await_part(self, manifest: Manifest, node: int) -> list[FileEntry]:
        rel, deadline, pause = _part_rel(manifest.name, node), time.monotonic() + self.part_timeout, 0.05
        while True:
            try:
                part = json.loads(self.remote.read_bytes(rel))
                if isinstance(part, dict) and part.get("save_id") == manifest.extra.get("save_id"):
                    return [_entry(f, f"{self.remote.url}/{rel}") for f in part["files"]]
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                pass  # not there yet, or an older save's part still being replaced
            if time.monotonic() > deadline:
                raise RemoteError(f"node {node}'s part of {manifest.name} did not arrive in {self.part_timeout:.0f}s")
            if self._stop.wait(pause):
                raise RemoteError(f"stopped waiting for node {node}'s part of {manifest.name}")
            pause = min(pause * 2, 1.0)

    def holds(self, manifest: Manifest) -> bool:
        """Whether the run holds ``manifest``'s part committed: a manifest listing each of its files, same digest."""
        try:
            remote_manifest, _ = self.remote.read_manifest(manifest.name)
        except (FileNotFoundError, CheckpointCorrupt, OSError, RemoteError):
            return False
        there = {(f.path, f.size, f.sha256) for f in remote_manifest.files}
        return all((f.path, f.size, f.sha256) in there for f in manifest.files)


def _entry(raw: Any, where: str) -> FileEntry:
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
        raise CheckpointCorrupt(f"{where}: malformed file entry")
    check_relative_path(raw["path"], where=where)
    return FileEntry(raw["path"], int(raw["size"]), str(raw["sha256"]), crc32c=raw.get("crc32c"))


# ---- resume -------------------------------------------------------------------------------------------------
def resume_nodes(
    objects: dict[str, Any],
    directory: Path,
    dist: Any,
    remote: Remote | None,
    storage_options: dict[str, Any] | None,
    path: str | None,
    start_fresh_if_damaged: bool,
    inputs: list[Path] | None = None,
) -> Resumed:
    """:func:`syncckpt.restore.resume_run` for node-local jobs (same arguments; ``inputs`` are not searched):
    rank 0 chooses among the run's committed checkpoints, every node gets the files its ranks need; collective."""
    if path is not None:
        raise SyncCkptError("resume(path) is not supported when each node keeps its own checkpoint directory")
    rejected: list[str] = []
    listing = None
    while True:
        if dist.is_main:
            try:
                listing = listing or (remote_listing(remote) if remote is not None else None)
                choice = _choose(directory, remote, listing, dist, rejected, start_fresh_if_damaged)
            except SyncCkptError as e:
                dist.broadcast_json({"error": f"{type(e).__name__}: {e}"})
                raise
            dist.broadcast_json({"error": None, "choice": choice})
        else:
            msg = dist.broadcast_json(None)
            if msg["error"]:
                raise SyncCkptError(f"rank 0 could not resume: {msg['error']}")
            choice = msg["choice"]
        if choice is None:
            return Resumed(None)
        problem = _fetch_part(directory, dist, remote, choice) if dist.commits and not dist.is_main else None
        problems = [p for p in dist.gather_json(problem, group=dist.step_group) if p]
        if not problems:
            break
        log.warning("Not resuming from %s: %s", choice["name"], "; ".join(problems))
        rejected.append(choice["name"])
    ckpt = directory / choice["name"]
    manifest, files = local.verify(ckpt)
    best = restore(objects, manifest, decode_checkpoint(files, str(ckpt)), ckpt, dist)
    source = choice["source"] if dist.node == 0 else getattr(remote, "url", "remote")
    return Resumed(_resume_info(manifest, ckpt, source), manifest, best)


def _choose(
    directory: Path, remote: Remote | None, listing: Any, dist: Any, rejected: list[str], start_fresh: bool
) -> dict[str, Any] | None:
    """Rank 0: the committed checkpoint to resume from, its own files verified locally or pulled."""
    if remote is None or listing is None:
        if local.list_checkpoints(directory):
            log.warning("Node-local checkpoints without a remote cannot be resumed across nodes; starting fresh")
        return None
    committed = set(listing.manifests)
    mine = {
        n: dataclasses.replace(m, files=needed_files(m, dist.node_ranks, dist.world_size))
        for n, m in listing.manifests.items()
    }
    search = find_resumable(
        directory,
        remote,
        listing=dataclasses.replace(listing, manifests=mine),
        accept=lambda n: n in committed and n not in rejected,
        decode=lambda m, files, p: decode_checkpoint(files, str(p)),
    )
    if search.found is None:
        if search.nothing_valid and not start_fresh:
            report = search.damage_report()
            raise NoValidCheckpoint(
                f"no valid checkpoint in {directory} or {remote.url}: {report}", where=remote.url, report=report
            )
        log.info("No committed checkpoint in %s; starting from scratch", remote.url)
        return None
    m = search.found.manifest
    return {"name": m.name, "save_id": m.extra.get("save_id"), "source": search.found.source}


def _fetch_part(directory: Path, dist: Any, remote: Remote | None, choice: dict[str, Any]) -> str | None:
    """A node's first rank: pull the files its ranks need of the chosen checkpoint; None, or what went wrong."""
    name = choice["name"]
    if remote is None:
        return f"node {dist.node} has no remote to pull {name} from"
    try:
        m, _ = remote.read_manifest(name)
        if m.extra.get("save_id") != choice["save_id"]:
            return f"node {dist.node}: {remote.url}/{name} is another save than rank 0's copy"
        pull(remote, name, directory, dataclasses.replace(m, files=needed_files(m, dist.node_ranks, dist.world_size)))
    except (CheckpointCorrupt, FileNotFoundError, OSError, RemoteError) as e:
        return f"node {dist.node}: {e}"
    return None
