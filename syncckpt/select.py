"""Which checkpoint to resume from: a pure function over local and remote candidates.

Candidates are tried in the order returned here; the caller verifies each and moves on to the next when
verification fails. Healthy checkpoints come before unhealthy ones (non-finite weights), newest first by global
step, then epoch > best > step (at an epoch's end the step checkpoint was taken before validation), and a local
copy before a remote copy of the same checkpoint.

>>> c = [Candidate("checkpoint-step-500", "step", 500, 0, "remote", "aa"),
...      Candidate("checkpoint-epoch-0", "epoch", 500, 0, "local", "bb"),
...      Candidate("checkpoint-step-500", "step", 500, 0, "local", "aa"),
...      Candidate("checkpoint-step-600", "step", 600, 0, "local", "cc", healthy=False)]
>>> for x in order_candidates(c):
...     print(x.name, x.location)
checkpoint-epoch-0 local
checkpoint-step-500 local
checkpoint-step-500 remote
checkpoint-step-600 local
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .manifest import Kind
from .retention import KIND_PRIORITY


@dataclass(frozen=True)
class Candidate:
    """One place a checkpoint could be resumed from."""

    name: str
    kind: Kind
    global_step: int
    epoch: int
    location: str  # "local", "input" (a read-only folder such as /kaggle/input/...) or "remote"
    manifest_sha256: str
    healthy: bool = True
    folder: str = ""  # where an "input" checkpoint lies


def order_candidates(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Resume order: healthy first, then newest, then kind priority, then local before remote."""
    return sorted(
        candidates,
        key=lambda c: (c.healthy, c.global_step, KIND_PRIORITY[c.kind], c.location == "local"),
        reverse=True,
    )
