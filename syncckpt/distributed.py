"""Coordination between ranks under torchrun: who writes what, and agreeing on decisions.

Replicated state (model, optimizer, ... under DDP) is written once, by rank 0; every rank writes its own RNG
state. A checkpoint commits only after every rank has written and fsynced its part: the ranks gather their file
entries on rank 0, which writes the manifest and renames the folder. A rank that dies mid-save makes the gather
fail on rank 0, so no manifest is written and nothing commits.

Two dedicated gloo groups keep checkpoint traffic apart from training collectives (NCCL or gloo) and from each
other: one for the training thread (per-step agreement: a due time-based save, a SIGTERM seen by any rank), one
for the background writer (gathering file entries). Messages are JSON in uint8 tensors: nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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

    @classmethod
    def detect(cls) -> Dist | None:
        """The job's layout when torch.distributed is initialised (a world of one too: sharded state still goes
        through DCP); collective (every rank must construct its CheckpointManager at the same point)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        step_group = dist.new_group(backend="gloo")
        save_group = dist.new_group(backend="gloo")
        return cls(dist.get_rank(), dist.get_world_size(), step_group, save_group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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
