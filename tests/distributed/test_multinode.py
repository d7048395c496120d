"""Two torchrun "nodes" on one machine (static rendezvous, 2 ranks each, DDP or FSDP2 on gloo), each with a
private checkpoint directory in its own temporary tree (no shared file system), mirrored to moto S3. Each node
writes and uploads its own part (under FSDP2 its ranks' DCP shards too); a checkpoint is committed in the bucket
only once every node's part landed.

Kills are real SIGKILLs of every process (torchrun starts ranks in sessions of their own, so each rank's pid is
killed, not just torchrun's group); the tests wait on the jobs' own output lines, never on sleeps.
"""

from __future__ import annotations

import json
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from servers import rendezvous_port

from syncckpt.manifest import Manifest
from syncckpt.remote import open_remote
from syncckpt.sharded import is_shard_file

JOB = Path(__file__).with_name("multinode_job.py")
HEAVY = os.environ.get("SYNCCKPT_HEAVY") == "1"
RANKS = {0: (0, 1), 1: (2, 3)}  # node -> its global ranks
OWN_FILES = {r: (f"rng-rank{r}.safetensors", f"state-rank{r}.json") for r in (1, 2, 3)}


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("SYNCCKPT_FAILPOINT", None)
    e.update(extra or {})
    e["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + e.get("PYTHONPATH", "")
    return e


class Job:
    """Both nodes of one launch: node N runs ``torchrun --node_rank N`` with ``tree/nodeN/{ck,out}``."""

    def __init__(self, tree: Path, args: list[str], node_env: dict[int, dict[str, str]] | None = None):
        port = rendezvous_port()
        self.lines: dict[int, list[str]] = {0: [], 1: []}
        self.pids: list[int] = []
        self._events: queue.Queue[tuple[int, str | None]] = queue.Queue()
        self.procs = {}
        for node in (0, 1):
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2"]
            launcher += ["--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
            own = [f"--ckpt-dir={tree / f'node{node}' / 'ck'}", f"--out-dir={tree / f'node{node}' / 'out'}"]
            p = subprocess.Popen(
                [*launcher, str(JOB), *own, *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=_env((node_env or {}).get(node)),
                start_new_session=True,
            )
            self.procs[node] = p
            threading.Thread(target=self._read, args=(node, p), daemon=True).start()

    def _read(self, node: int, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            self._events.put((node, line.rstrip("\n")))
        self._events.put((node, None))

    def _watch(self, node: int, rank: int, pid: int) -> None:
        """Post ``exited rank R`` on ``node``'s stream when that rank's process ends (a pidfd: no polling)."""
        self.pids.append(pid)
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._events.put((node, f"exited rank {rank}"))
            return

        def wait() -> None:
            select.select([fd], [], [])
            os.close(fd)
            self._events.put((node, f"exited rank {rank}"))

        threading.Thread(target=wait, daemon=True).start()

    def run(self, until=None, timeout: float = 300) -> Job:
        """Read both nodes' output until ``until(node, line)`` (line None: that node's output ended) is true, then
        SIGKILL every process of the job; without ``until``, until both nodes end."""
        ended: set[int] = set()
        finished = False
        try:
            while len(ended) < 2:
                node, line = self._events.get(timeout=timeout)
                if line is None:
                    ended.add(node)
                else:
                    self.lines[node].append(line)
                    if line.startswith("pid "):
                        self._watch(node, *map(int, line.split()[1:3]))
                if until is not None and until(node, line):
                    break
            else:
                finished = until is None
        finally:
            if not finished:
                self.kill()
            for p in self.procs.values():
                p.wait(timeout=60)
        return self

    def kill(self) -> None:
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self.pids:  # the ranks: sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log(self) -> str:
        return "\n".join(["--- node 0", *self.lines[0][-25:], "--- node 1", *self.lines[1][-25:]])

    def returncodes(self) -> list[int | None]:
        return [self.procs[n].returncode for n in (0, 1)]


def _tensors(tree: Path, files: str) -> dict[int, dict[str, torch.Tensor]]:
    return {r: load_file(str(tree / f"node{n}" / files.format(r=r))) for n, rs in RANKS.items() for r in rs}


def assert_same(
    reference: Path, tree: Path, files: str = "out/rank{r}.safetensors", reference_files: str | None = None
) -> None:
    """Every rank's tensors in ``tree`` (``files``, per node) equal the uninterrupted run's, bit for bit."""
    want, got = _tensors(reference, reference_files or files), _tensors(tree, files)
    for rank in want:
        assert want[rank].keys() == got[rank].keys()
        diff = [k for k in want[rank] if not torch.equal(want[rank][k], got[rank][k])]
        assert not diff, f"rank {rank} differs from the uninterrupted run: {diff[:8]}"


def _shard(rank: int) -> str:
    return f"dcp/shard-{rank:05d}-of-00004.safetensors"


def _own(rank: int, fsdp: bool) -> list[str]:
    """A rank's own files in a checkpoint: its RNG and state (rank 0's are the replicated ones), its DCP shard."""
    return [*OWN_FILES.get(rank, ()), *([_shard(rank)] if fsdp else [])]


def assert_own_files_only(tree: Path, fsdp: bool = False) -> None:
    """No node read or wrote the other's directory: node 0's tree holds no file of ranks 2 and 3, node 1's none
    of ranks 0 and 1 (rank 0's replicated state aside), and every part node 1 wrote itself lists only its own
    ranks' files."""
    files = {n: [p.name for p in (tree / f"node{n}").rglob("*") if p.is_file()] for n in (0, 1)}
    foreign = {0: [*_own(2, fsdp), *_own(3, fsdp)], 1: [*_own(0, fsdp), *_own(1, fsdp)]}
    for node, paths in foreign.items():
        names = {Path(p).name for p in paths}
        assert not names & set(files[node]), f"node {node} holds another node's files: {files[node]}"
    part = Manifest.from_bytes((tree / "node1" / "ck" / "checkpoint-epoch-1" / "manifest.json").read_bytes())
    assert sorted(f.path for f in part.files) == sorted([*_own(2, fsdp), *_own(3, fsdp)])


def _args(url: str, options: dict) -> list[str]:
    return ["--remote", url, "--storage-options", json.dumps(options), "--sync-saves"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tree = tmp_path_factory.mktemp("multinode-ref")
    job = Job(tree, []).run()
    assert job.returncodes() == [0, 0], job.log()
    assert any("node-local (2 nodes)" in ln for ln in job.lines[0]), job.log()
    return tree


def _node1_dies_sending_step_4(tmp_path: Path, store, args: list[str]) -> Job:
    """Node 1 SIGKILLs itself while sending its part of checkpoint-step-4 (data sent, part not yet recorded); the
    test then SIGKILLs every other process of the job (mid-epoch: checkpoint-step-2 is committed)."""
    job = Job(tmp_path, args, node_env={1: {"SYNCCKPT_FAILPOINT": "remote-data:2"}})
    seen: set[str] = set()

    def both(node: int, line: str | None) -> bool:  # node 1's uploader is gone, and node 0 sent its own part
        if line == "exited rank 2" or (node == 0 and "Node 0's part of checkpoint-step-4 is in" in (line or "")):
            seen.add(line or "")
        return len(seen) == 2

    job.run(until=both)
    assert any(ln == "step 2" for ln in job.lines[0]), job.log()  # printed once step 2's save was committed
    assert store.list_checkpoints() == ["checkpoint-step-2"], job.log()
    assert store.read_latest().name == "checkpoint-step-2"
    with pytest.raises(FileNotFoundError):
        store.read_bytes("checkpoint-step-4/parts/node-1.json")
    store.read_bytes("checkpoint-step-4/parts/node-0.json")  # node 0 sent its part; the commit waited for node 1's
    assert (tmp_path / "node0" / "ck" / "checkpoint-step-4" / "manifest.json").exists()  # committed locally
    committed = json.loads(store.read_bytes("checkpoint-step-2/manifest.json"))
    paths = {f["path"] for f in committed["files"]}
    assert paths >= {"model.safetensors", *(f for r in (1, 2, 3) for f in OWN_FILES[r])}, paths
    assert committed["world_size"] == 4 and all(len(f["sha256"]) == 64 for f in committed["files"])
    return job


@pytest.mark.slow
def test_node_dying_mid_upload_commits_nothing_and_job_resumes_bit_identical_from_bucket_with_wiped_disks(
    tmp_path, reference, s3_remote_url, s3_storage_options
):
    store = open_remote(s3_remote_url, s3_storage_options)
    args = _args(s3_remote_url, s3_storage_options)
    _node1_dies_sending_step_4(tmp_path, store, args)
    for n in (0, 1):  # new VMs: both local directories are gone, the bucket is all there is
        shutil.rmtree(tmp_path / f"node{n}" / "ck")
    job = Job(tmp_path, args).run()
    assert job.returncodes() == [0, 0], job.log()
    assert any("Resuming from global step 2" in ln for ln in job.lines[0]), job.log()  # mid-epoch 0
    assert any("Pulled checkpoint-step-2" in ln for ln in job.lines[1]), job.log()
    assert_same(reference, tmp_path)
    assert_own_files_only(tmp_path)
    assert store.read_latest().name in ("checkpoint-step-8", "checkpoint-epoch-1")


@pytest.mark.slow
@pytest.mark.skipif(not HEAVY, reason="three more two-node launches; SYNCCKPT_HEAVY=1 runs it")
def test_node_dying_mid_upload_then_job_sigkilled_after_a_commit_resumes_bit_identical(
    tmp_path, reference, s3_remote_url, s3_storage_options
):
    """Node 0 keeps its disk (with its uncommitted part of step 4) and node 1 comes back empty: step 2 resumes.
    Then the whole job is SIGKILLed mid-epoch right after checkpoint-step-6 was committed; both disks are wiped
    and the job resumes from the bucket."""
    store = open_remote(s3_remote_url, s3_storage_options)
    args = _args(s3_remote_url, s3_storage_options)
    ck = {n: tmp_path / f"node{n}" / "ck" for n in (0, 1)}
    _node1_dies_sending_step_4(tmp_path, store, args)

    # 2. node 1 comes back with an empty disk (a new VM); the previous committed checkpoint resumes. Then the whole
    #    job is SIGKILLed mid-epoch, right after checkpoint-step-6 was committed by both nodes.
    shutil.rmtree(tmp_path / "node1")
    job = Job(tmp_path, [*args, "--hold-at", "7"]).run(until=lambda node, line: node == 0 and line == "step 7")
    assert any("Resuming from global step 2" in ln for ln in job.lines[0]), job.log()
    assert any("Pulled checkpoint-step-2" in ln for ln in job.lines[1]), job.log()
    assert store.read_latest().name == "checkpoint-step-6"

    # 3. both local directories wiped: the relaunched job resumes from the bucket, bit-identical at the end
    for n in (0, 1):
        shutil.rmtree(ck[n])
    job = Job(tmp_path, args).run()
    assert job.returncodes() == [0, 0], job.log()
    assert any("Resuming from global step 6" in ln for ln in job.lines[0]), job.log()
    assert_same(reference, tmp_path)
    assert_own_files_only(tmp_path)
    final = json.loads(store.read_bytes("checkpoint-epoch-1/manifest.json"))
    paths = {f["path"] for f in final["files"]}
    assert final["world_size"] == 4 and paths >= {"model.safetensors", *(f for r in (1, 2, 3) for f in OWN_FILES[r])}
    assert all(len(f["sha256"]) == 64 for f in final["files"])


@pytest.mark.slow
@pytest.mark.skipif(not HEAVY, reason="three more two-node launches; SYNCCKPT_HEAVY=1 runs it")
def test_whole_job_sigkilled_while_mirroring_in_background_resumes_bit_identical(
    tmp_path, reference, s3_remote_url, s3_storage_options
):
    """Saves mirrored in the background (no wait in the loop): killed once rank 0 reports a checkpoint mirrored."""
    store = open_remote(s3_remote_url, s3_storage_options)
    args = _args(s3_remote_url, s3_storage_options)[:-1]
    job = Job(tmp_path, args).run(until=lambda node, line: node == 0 and "Mirrored checkpoint-step-" in (line or ""))
    newest = max(store.read_manifest(n)[0].global_step for n in store.list_checkpoints())
    for n in (0, 1):
        shutil.rmtree(tmp_path / f"node{n}" / "ck")
    job = Job(tmp_path, args).run()
    assert job.returncodes() == [0, 0], job.log()
    assert any(f"Resuming from global step {newest}" in ln for ln in job.lines[0]), job.log()
    assert_same(reference, tmp_path)
    assert_own_files_only(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not HEAVY, reason="two more two-node launches; SYNCCKPT_HEAVY=1 runs it")
def test_coordinator_dying_before_the_manifest_commits_nothing_and_previous_resumes(
    tmp_path, reference, s3_remote_url, s3_storage_options
):
    """Rank 0 SIGKILLs itself after both nodes' parts of checkpoint-step-4 landed, before its manifest: not
    committed; with both local directories kept (each holding its part of step 4), the job resumes step 2."""
    store = open_remote(s3_remote_url, s3_storage_options)
    args = _args(s3_remote_url, s3_storage_options)
    job = Job(tmp_path, args, node_env={0: {"SYNCCKPT_FAILPOINT": "remote-manifest:2"}})
    job.run(until=lambda node, line: line == "exited rank 0")
    assert store.list_checkpoints() == ["checkpoint-step-2"], job.log()
    for node in (0, 1):
        part = json.loads(store.read_bytes(f"checkpoint-step-4/parts/node-{node}.json"))
        assert part["files"], part
    job = Job(tmp_path, args).run()
    assert job.returncodes() == [0, 0], job.log()
    assert any("Resuming from global step 2" in ln for ln in job.lines[0]), job.log()
    assert_same(reference, tmp_path)


def _resumed_files(job: Job, node: int) -> set[str]:
    line = next(ln for ln in job.lines[node] if ln.startswith("resumed-files "))
    return set(json.loads(line.split(" ", 1)[1]))


@pytest.mark.slow
def test_fsdp2_job_sigkilled_after_a_commit_resumes_bit_identical_from_bucket_each_node_pulling_its_own_shards(
    tmp_path, s3_remote_url, s3_storage_options
):
    """FSDP2 over both nodes, each rank writing its own DCP shard. The whole job is SIGKILLed mid-epoch once
    checkpoint-step-6 was committed (every rank wrote its tensors after step 7); both local directories are
    wiped; the relaunched job resumes step 6 from the bucket and reaches the same tensors after step 7, bit for
    bit. Each node pulled the DCP index, rank 0's replicated state and its own ranks' shards only."""
    store = open_remote(s3_remote_url, s3_storage_options)
    args = [*_args(s3_remote_url, s3_storage_options), "--fsdp", "--dump-at", "7"]
    job = Job(tmp_path, [*args, "--hold-at", "7"]).run(until=lambda node, line: node == 0 and line == "step 7")
    latest = store.read_latest()
    assert latest is not None and latest.name == "checkpoint-step-6", job.log()
    committed, _ = store.read_manifest("checkpoint-step-6")
    assert committed.world_size == 4
    assert {"dcp/index.json", *map(_shard, range(4))} <= {f.path for f in committed.files}
    for n in (0, 1):  # new VMs: both local directories are gone; the tensors after step 7 are kept aside
        shutil.rmtree(tmp_path / f"node{n}" / "ck")
        (tmp_path / f"node{n}" / "out").rename(tmp_path / f"node{n}" / "first")
    job = Job(tmp_path, args).run()
    assert job.returncodes() == [0, 0], job.log()
    assert any("Resuming from global step 6" in ln for ln in job.lines[0]), job.log()
    assert any("Pulled checkpoint-step-6" in ln for ln in job.lines[1]), job.log()
    step7 = "at-step-7-rank{r}.safetensors"
    assert_same(tmp_path, tmp_path, files=f"out/{step7}", reference_files=f"first/{step7}")
    for node, ranks in RANKS.items():
        pulled = _resumed_files(job, node)
        assert {f for f in pulled if is_shard_file(f)} == {_shard(r) for r in ranks}, pulled
        assert {"dcp/index.json", "state.json"} <= pulled, pulled
    assert_own_files_only(tmp_path, fsdp=True)


def test_a_node_needs_the_dcp_index_rank_0s_replicated_state_and_only_its_own_ranks_shards():
    from syncckpt.manifest import FileEntry
    from syncckpt.nodes import needed_files

    ranks = {str(r): [*_own(r, fsdp=True)] for r in range(4)}
    ranks["0"] += ["model.safetensors", "state.json", "dcp/index.json"]
    files = [FileEntry(p, 1, "0" * 64) for p in sorted({p for ps in ranks.values() for p in ps})]
    m = Manifest("checkpoint-step-6", "step", 6, 1, 3, files=files, world_size=4, extra={"ranks": ranks})
    replicated = {"model.safetensors", "state.json", "dcp/index.json"}
    assert {f.path for f in needed_files(m, [2, 3], 4)} == {*replicated, *_own(2, True), *_own(3, True)}
    assert {f.path for f in needed_files(m, [0, 1], 4)} == {*replicated, *_own(0, True), *_own(1, True)}
    resharding = {f.path for f in needed_files(m, [0, 1], 2)}  # another world size: any shard may be read
    assert resharding == {*replicated, *map(_shard, range(4)), *_own(1, False)}
    m.extra["ranks"]["2"] = _shard(2)  # not a list of paths: names nothing
    assert {f.path for f in needed_files(m, [2], 4)} == replicated


# ---- the commit protocol in one process (memory:// store; the nodes' uploaders called directly, no torchrun) ----
def _part(folder: Path, name: str, files: dict[str, bytes], save_id: str, node: int) -> Path:
    from syncckpt import local

    ranks = {"0": ["model.safetensors", "state.json"], "2": ["rng-rank2.safetensors"]}
    m = Manifest(
        name, "step", 4, 0, 3, files=[], world_size=4, extra={"save_id": save_id, "node": node, "ranks": ranks}
    )
    local.commit(folder, m, lambda tmp: [local.write_file(tmp, p, [b]) for p, b in files.items()])
    return folder / name


def test_coordinator_commits_only_after_every_node_part_of_the_same_save(tmp_path):
    import uuid

    from syncckpt.errors import RemoteError
    from syncckpt.nodes import NodeMirror
    from syncckpt.pull import pull
    from syncckpt.remote.run import RemoteRun

    url = f"memory://multinode-{uuid.uuid4().hex[:8]}/run"
    name = "checkpoint-step-4"
    node0 = _part(tmp_path / "n0", name, {"model.safetensors": b"weights", "state.json": b"{}"}, "job-b", 0)
    node1 = _part(tmp_path / "n1", name, {"rng-rank2.safetensors": b"rng2"}, "job-b", 1)
    coordinator = NodeMirror(open_remote(url), 0, 2, RemoteRun(open_remote(url)), part_timeout=0.5)
    other = NodeMirror(open_remote(url), 1, 2, None)
    store = open_remote(url)
    # node 1's part of an earlier save of the same name (another job) does not count
    store.write_bytes(f"{name}/parts/node-1.json", json.dumps({"node": 1, "save_id": "job-a", "files": []}).encode())
    with pytest.raises(RemoteError, match="node 1's part"):
        coordinator.publish(node0)
    assert store.list_checkpoints() == [] and store.read_latest() is None

    done: list = []
    t = threading.Thread(target=lambda: done.append(coordinator.publish(node0)))
    coordinator.part_timeout = 60
    t.start()
    other.publish(node1)  # the coordinator's own part is not sent twice; it commits once node 1's lands
    t.join(60)
    assert done and store.read_latest().name == name
    committed, _ = store.read_manifest(name)
    assert sorted(f.path for f in committed.files) == ["model.safetensors", "rng-rank2.safetensors", "state.json"]
    assert "node" not in committed.extra and committed.extra["save_id"] == "job-b"
    _, files, _ = pull(store, name, tmp_path / "pulled", progress=False)  # every digest checks out
    assert files["rng-rank2.safetensors"] == b"rng2"
    assert other.holds(Manifest.from_bytes((node1 / "manifest.json").read_bytes()))
