"""Fixtures of the reliability suite. ``SYNCCKPT_HEAVY=1`` runs each test with several times more trials/steps.

The helpers next to this file (``forkserver.py``, ``crash_job.py``, ``storage_checks.py``) are imported by module
name, so this folder goes on ``sys.path`` (the suite runs with ``--import-mode=importlib``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

HEAVY = os.environ.get("SYNCCKPT_HEAVY", "") not in ("", "0")


@pytest.fixture
def heavy() -> bool:
    """True under ``SYNCCKPT_HEAVY=1``: tests scale their trial counts with it."""
    return HEAVY


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str, dict[str, Any] | None]:
    """(kind, run URL, storage_options) for ``request.param`` in file / s3 / memory; parametrize indirectly."""
    kind = request.param
    if kind == "file":
        return kind, (tmp_path / "bucket" / "run").as_uri(), None
    if kind == "memory":
        return kind, f"memory://reliability-{os.urandom(6).hex()}/run", None
    if kind == "s3":
        return kind, request.getfixturevalue("s3_remote_url"), request.getfixturevalue("s3_storage_options")
    raise ValueError(kind)
