"""Which checkpoints to keep: a pure function over plain data, used for the local folder and the remote alike.

>>> refs = [Ref("checkpoint-step-100", "step", 100, 0), Ref("checkpoint-step-200", "step", 200, 0),
...         Ref("checkpoint-epoch-0", "epoch", 250, 0), Ref("checkpoint-epoch-1", "epoch", 500, 1),
...         Ref("best_model", "best", 250, 0)]
>>> plan_deletions(refs, keep_last=1, keep_epochs=1)
['checkpoint-epoch-0', 'checkpoint-step-100']

With a mirror, :func:`local_copies_to_drop` bounds the local copies further (``keep_local``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .manifest import Kind, Latest, Manifest, parse_checkpoint_name, sha256_hex

# On equal global steps: epoch > best > step. A step checkpoint at an epoch's last batch is taken before that
# epoch's validation and its epoch/best checkpoints at the same step; resuming from those skips validating again.
KIND_PRIORITY = {"epoch": 2, "best": 1, "step": 0}


@dataclass(frozen=True)
class Ref:
    """What retention and selection need to know about one checkpoint."""

    name: str
    kind: Kind
    global_step: int
    epoch: int
    healthy: bool = True


def recency(ref: Ref) -> tuple[int, int]:
    """Sort key: newer global step first, then the seed's kind priority."""
    return ref.global_step, KIND_PRIORITY[ref.kind]


def plan_deletions(refs: Iterable[Ref], keep_last: int, keep_epochs: int, protected: Iterable[str] = ()) -> list[str]:
    """Names to delete, sorted.

    Keeps the newest ``keep_last`` step checkpoints, the newest ``keep_epochs`` epoch checkpoints, ``best_model``,
    everything in ``protected`` (a checkpoint being uploaded, the one a run resumed from), and always the newest
    healthy checkpoint, so a diverged run never evicts the last good state.
    """
    refs = list(refs)
    keep: set[str] = set(protected)
    steps = sorted((r for r in refs if r.kind == "step"), key=recency, reverse=True)
    epochs = sorted((r for r in refs if r.kind == "epoch"), key=lambda r: (r.epoch, r.global_step), reverse=True)
    keep.update(r.name for r in steps[: max(keep_last, 0)])
    keep.update(r.name for r in epochs[: max(keep_epochs, 0)])
    keep.update(r.name for r in refs if r.kind == "best")
    healthy = sorted((r for r in refs if r.healthy), key=recency, reverse=True)
    if healthy:
        keep.add(healthy[0].name)
    return sorted(r.name for r in refs if r.name not in keep)


KEEP_LOCAL = ("all", "newest", "none")


def local_copies_to_drop(local: Iterable[Ref], mirrored: Iterable[str], keep_local: str) -> list[str]:
    """With a mirror, the local copies to delete under ``keep_local``, sorted. ``mirrored``: the checkpoints
    verified in the store. ``"all"`` keeps what retention keeps; ``"newest"`` keeps only the newest local
    checkpoint; ``"none"`` keeps none once it is mirrored. A copy the store does not hold is kept, unless it is
    a step checkpoint older than a mirrored one (its upload was skipped as superseded): else a mirror that falls
    behind would fill the disk with them.

    >>> refs = [Ref("checkpoint-step-10", "step", 10, 0), Ref("checkpoint-step-20", "step", 20, 0),
    ...         Ref("checkpoint-step-30", "step", 30, 0), Ref("checkpoint-epoch-0", "epoch", 5, 0)]
    >>> local_copies_to_drop(refs, ["checkpoint-step-20"], "none")  # step 10: superseded; epoch 0: not mirrored
    ['checkpoint-step-10', 'checkpoint-step-20']
    >>> local_copies_to_drop(refs, ["checkpoint-step-20", "checkpoint-step-30"], "newest")
    ['checkpoint-step-10', 'checkpoint-step-20']
    >>> local_copies_to_drop(refs, ["checkpoint-step-30"], "all")
    []
    """
    if keep_local not in KEEP_LOCAL:
        raise ValueError(f"keep_local must be one of {', '.join(KEEP_LOCAL)}, got {keep_local!r}")
    refs = list(local)
    if keep_local == "all" or not refs:
        return []
    keep = {max(refs, key=recency).name} if keep_local == "newest" else set()
    done = set(mirrored)
    newest_step = max((r.global_step for r in refs if r.name in done and r.kind == "step"), default=None)
    superseded = {r.name for r in refs if r.kind == "step" and newest_step is not None and r.global_step < newest_step}
    return sorted(r.name for r in refs if (r.name in done or r.name in superseded) and r.name not in keep)


def next_latest(current: Latest | None, manifest: Manifest, manifest_bytes: bytes) -> Latest | None:
    """The LATEST to write after committing ``manifest``, or None when the current one is newer: LATEST never
    moves backwards (mirroring ``best_model`` or pushing an old checkpoint leaves it alone).

    >>> m = Manifest("best_model", "best", 100, 3, -1, files=[])
    >>> next_latest(Latest("checkpoint-step-120", 120, "0" * 64), m, b"{}") is None
    True
    >>> next_latest(None, m, b"{}").name
    'best_model'
    """
    if current is not None and current.name != manifest.name:
        parsed = parse_checkpoint_name(current.name)
        cur = Ref(current.name, parsed[0] if parsed else "best", current.global_step, 0)
        if recency(cur) > recency(Ref(manifest.name, manifest.kind, manifest.global_step, 0)):
            return None
    return Latest(manifest.name, manifest.global_step, sha256_hex(manifest_bytes))
