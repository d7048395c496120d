"""syncckpt: cloud-synced, exactly-resumable, pickle-free training checkpoints.

>>> from syncckpt import CheckpointManager, ResumableSampler, ResumeInfo
"""

from __future__ import annotations

__version__ = "0.1.0"

from .augment import PerSampleRandom, sample_generator
from .data import ResumableLoader, ShuffleBuffer
from .errors import (
    CheckpointCorrupt,
    CheckpointNotFound,
    ConfigError,
    LeaseHeld,
    NoValidCheckpoint,
    RemoteConflict,
    RemoteError,
    StateMismatch,
    StateNotSerializable,
    SyncCkptError,
    UnsafeCheckpoint,
    UnsupportedFormat,
)
from .manager import CheckpointManager, ResumeInfo
from .sampler import ResumableSampler

__all__ = [
    "CheckpointManager",
    "ResumableSampler",
    "ResumableLoader",
    "ShuffleBuffer",
    "PerSampleRandom",
    "sample_generator",
    "ResumeInfo",
    "SyncCkptError",
    "CheckpointNotFound",
    "CheckpointCorrupt",
    "NoValidCheckpoint",
    "UnsafeCheckpoint",
    "UnsupportedFormat",
    "StateNotSerializable",
    "StateMismatch",
    "RemoteError",
    "RemoteConflict",
    "LeaseHeld",
    "ConfigError",
    "__version__",
]
