"""Coordination between ranks under torchrun: who writes what, and agreeing on decisions.

Replicated state (model, optimizer, ... under DDP) is written once, by rank 0; every rank writes its own RNG
state. A checkpoint commits only after every rank has written and fsynced its part: the ranks gather their file
entries on rank 0, which writes the manifest and renames the folder. A rank that dies mid-save makes the gather
fail on rank 0, so no manifest is written and nothing commits.

Two dedicated gloo groups keep checkpoint traffic apart from training collectives (NCCL or gloo) and from each
other: one for the training thread (per-step agreement: a due time-based save, a SIGTERM seen by any rank), one
for the background writer (gathering file entries). Messages are JSON in uint8 tensors: nothing is pickled.

On a cluster without a shared file system (``node_local``, see :mod:`syncckpt.nodes`) each node's local rank 0
commits and mirrors its own ranks' files from its own disk; :attr:`Dist.commits` and :attr:`Dist.uploads` say
which processes do.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in the job, with the groups checkpointing uses."""

    rank: int
    world_size: int
    step_group: Any
    save_group: Any
    #: True under torch.distributed; False for :class:`Solo`, so callers never branch on "no job".
    active: bool = True
    node: int = 0  # this process's node (torchrun's GROUP_RANK), and its rank on that node
    local_rank: int = 0
    #: the node of every global rank, in rank order
    node_of: list[int] = field(default_factory=lambda: [0])
    #: each node writes and mirrors its own part from its own disk (set by ``writer.open_directory``)
    node_local: bool = False
    token: str = ""  # the job's token, the same on every rank (names temporary folders and saves)

    @classmethod
    def detect(cls) -> Dist:
        """The job's layout when torch.distributed is initialised (a world of one too: sharded state still goes
        through DCP), else :class:`Solo`; collective (every rank must construct its CheckpointManager at the same
        point)."""
        if not (dist.is_available() and dist.is_initialized()):
            return Solo()
        step_group = dist.new_group(backend="gloo")
        save_group = dist.new_group(backend="gloo")
        me = cls(dist.get_rank(), dist.get_world_size(), step_group, save_group)
        places = me.gather_json(_node_id(), group=step_group)
        nodes = sorted(set(places), key=lambda n: (len(n), n))  # "10" after "9"
        me.node_of = [nodes.index(n) for n in places]
        me.node = me.node_of[me.rank]
        me.local_rank = me.node_ranks.index(me.rank)  # the node's first global rank commits and mirrors
        return me

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(self.node_of) + 1

    @property
    def node_ranks(self) -> list[int]:
        """The global ranks on this process's node."""
        return [r for r, n in enumerate(self.node_of) if n == self.node]

    @property
    def commits(self) -> bool:
        """Whether this process commits checkpoints into its folder: rank 0, or each node's first rank when
        every node keeps its own part."""
        return self.is_main or (self.node_local and self.local_rank == 0)

    @property
    def uploads(self) -> bool:
        """Whether this process runs an uploader (the same processes that commit)."""
        return self.commits

    def agree(self, *flags: bool) -> list[bool]:
        """Element-wise OR of ``flags`` over all ranks (training thread)."""
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.step_group)
        return [bool(x) for x in t.tolist()]

    def broadcast_json(self, obj: Any, *, group: Any = None) -> Any:
        """``obj`` of rank 0, on every rank."""
        group = group or self.step_group
        data = json.dumps(obj).encode() if self.is_main else b""
        n = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(n, src=0, group=group)
        buf = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if self.is_main
            else torch.empty(int(n), dtype=torch.uint8)
        )
        if int(n):
            dist.broadcast(buf, src=0, group=group)
        return json.loads(bytes(buf.tolist())) if int(n) else None

    def gather_json(self, obj: Any, *, group: Any = None) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        group = group or self.save_group
        data = json.dumps(obj).encode()
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=group)
        longest = max(int(s) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(bufs, mine, group=group)
        return [json.loads(bytes(b[: int(s)].tolist())) for b, s in zip(bufs, sizes, strict=True)]

    def barrier(self, *, group: Any = None) -> None:
        dist.barrier(group=group or self.step_group)


def _node_id() -> str:
    """This machine's node under torchrun (GROUP_RANK, or NODE_RANK), else its host name."""
    for var in ("GROUP_RANK", "NODE_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return value
    return socket.gethostname()


class Solo(Dist):
    """A process outside any torch.distributed job: rank 0 of 1, and every collective answers at once with what
    one rank would get (JSON round-tripped, as a real broadcast returns it).

    >>> solo = Solo()
    >>> solo.is_main, solo.agree(True, False), solo.gather_json({"a": (1, 2)}), solo.active
    (True, [True, False], [{'a': [1, 2]}], False)
    """

    def __init__(self) -> None:
        super().__init__(rank=0, world_size=1, step_group=None, save_group=None, active=False)

    def agree(self, *flags: bool) -> list[bool]:
        return [bool(f) for f in flags]

    def broadcast_json(self, obj: Any, *, group: Any = None) -> Any:
        return json.loads(json.dumps(obj))

    def gather_json(self, obj: Any, *, group: Any = None) -> list[Any]:
        return [json.loads(json.dumps(obj))]

    def barrier(self, *, group: Any = None) -> None:
        pass
