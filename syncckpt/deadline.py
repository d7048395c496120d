"""The session deadline: a Kaggle or Colab session stops at a hard limit; take and mirror a checkpoint before it.

A :class:`Deadline` is a wall-clock instant and the reason for it. The manager asks :meth:`Deadline.save_due` at
each ``step()``: the checkpoint is due once what is left before the deadline no longer covers the time the last
save took to become durable (committed, and mirrored when there is a remote) plus a margin. Then it ends the run
the way SIGTERM does: it takes that last checkpoint, waits until it is mirrored and exits with status 143, so no
step is trained that the deadline would throw away.

When the session started, per platform (:func:`session_start`):

- ``SYNCCKPT_SESSION_START`` (seconds since the epoch) when set: any platform, and the way to correct a guess.
- Kaggle and Colab: the start of the container's first process (PID 1; ``/proc/1/stat`` start time after the
  boot time in ``/proc/stat``). Each session runs in a container started for it, so its first process starts
  with the session; the notebook kernel itself may have been restarted since.
- Elsewhere: unknown (a duration then counts from the manager's creation).

Platform limits (:data:`PLATFORM_LIMITS`, :data:`TPU_LIMITS`): Kaggle 12 h for CPU and GPU sessions and 9 h for
TPU sessions; Colab 12 h (the free tier's longest runtime; it may end sooner when idle, which no clock predicts).
Colab Pro runtimes last up to 24 h: pass ``deadline="24h"`` or ``"off"`` there, as ``"auto"`` assumes the free tier.

A TPU session is recognised heuristically (:func:`syncckpt.env.detect_tpu`; Kaggle documents no flag for it): one
of the variables the TPU runtime, torch_xla or Colab set (``TPU_ACCELERATOR_TYPE``, ``TPU_NAME``,
``XRT_TPU_CONFIG``, ``COLAB_TPU_ADDR``) is set, or a TPU chip's device node ``/dev/accel0`` exists. When the guess
is wrong either way, ``deadline="9h"`` or ``deadline="12h"`` says what is right.

>>> clock = iter([0.0, 3000.0, 3520.0]).__next__
>>> d = Deadline(at=3600.0, why="a test limit", margin=60, clock=clock)
>>> d.save_due(last_durable_seconds=30.0)  # 3600 s left
False
>>> d.save_due(last_durable_seconds=30.0)  # 600 s left
False
>>> d.save_due(last_durable_seconds=30.0)  # 80 s left: under 30 s + the 60 s margin
True
>>> parse_duration("11h30m"), parse_duration("90s"), parse_duration("1.5h")
(41400.0, 90.0, 5400.0)
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger("syncckpt")

#: The hard session limits syncckpt knows, in seconds from the session's start.
PLATFORM_LIMITS = {"kaggle": 12 * 3600.0, "colab": 12 * 3600.0}
#: The limits of TPU sessions where they differ (Kaggle: 9 h).
TPU_LIMITS = {"kaggle": 9 * 3600.0}
PLATFORM_NAMES = {"kaggle": "Kaggle", "colab": "Colab"}
#: Until a save has been timed, what one is assumed to take (save, then mirror).
FIRST_SAVE_ESTIMATE = 300.0

_UNIT = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])")


@dataclass(frozen=True)
class Deadline:
    """When the session ends (``at``, seconds since the epoch), why, and the margin kept before it."""

    at: float
    why: str
    margin: float = 120.0
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    def left(self) -> float:
        """Seconds until the deadline (negative once passed)."""
        return self.at - self.clock()

    def save_due(self, last_durable_seconds: float | None) -> bool:
        """Whether a checkpoint started now is the last one that becomes durable before the deadline."""
        needed = FIRST_SAVE_ESTIMATE if last_durable_seconds is None else last_durable_seconds
        return self.left() <= needed + self.margin

    def describe(self) -> str:
        return f"{datetime.fromtimestamp(self.at).astimezone():%Y-%m-%d %H:%M %Z} ({self.why})"


def announce(deadline: Deadline | None) -> None:
    """One line at the start: when the session ends and that a checkpoint will be taken before it."""
    if deadline is not None:
        log.info(
            "Session deadline: %s; a checkpoint is taken and mirrored before it (deadline='off' disables this)",
            deadline.describe(),
        )


def taking_last(deadline: Deadline, global_step: int, last_durable_seconds: float | None) -> None:
    """The one line said when the deadline's checkpoint is taken."""
    took = "not timed yet" if last_durable_seconds is None else f"{last_durable_seconds:.1f} s"
    log.warning(
        "Session deadline %s in %.0f s: saving checkpoint-step-%d now, mirroring it, then stopping (a save took "
        "%s to be durable, margin %.0f s)",
        deadline.describe(),
        max(0.0, deadline.left()),
        global_step,
        took,
        deadline.margin,
    )


def parse_duration(text: str) -> float:
    """Seconds in ``"11h30m"``, ``"90m"``, ``"1.5h"``, ``"2d"``, ``"45s"``; ConfigError otherwise."""
    spec = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(spec)
    if not spec or "".join(a + u for a, u in parts) != spec:
        raise ConfigError(f"deadline {text!r}: expected a duration such as '11h30m', '90m' or '45s'")
    return sum(float(amount) * _UNIT[unit] for amount, unit in parts)


def session_start(
    platform: str | None, environ: Mapping[str, str] | None = None, proc: Path = Path("/proc")
) -> float | None:
    """When this notebook session started (seconds since the epoch), or None when unknown. See the module doc.

    >>> import tempfile
    >>> fake = Path(tempfile.mkdtemp()); (fake / "1").mkdir()
    >>> _ = (fake / "stat").write_text("cpu  1 2 3\\nbtime 1700000000\\n")
    >>> _ = (fake / "1" / "stat").write_text("1 (tini) S 0 1 1 0 -1 4194560 " + "0 " * 12 + "250000 0 0\\n")
    >>> session_start("kaggle", environ={}, proc=fake) == 1700000000 + 250000 / os.sysconf("SC_CLK_TCK")
    True
    >>> session_start(None, environ={}, proc=fake) is None, session_start(None, {"SYNCCKPT_SESSION_START": "5"})
    (True, 5.0)
    """
    environ = os.environ if environ is None else environ
    if environ.get("SYNCCKPT_SESSION_START"):
        try:
            return float(environ["SYNCCKPT_SESSION_START"])
        except ValueError:
            raise ConfigError(
                f"SYNCCKPT_SESSION_START={environ['SYNCCKPT_SESSION_START']!r}: expected seconds since the epoch"
            ) from None
    if platform not in PLATFORM_LIMITS:
        return None
    try:
        boot = next(
            float(line.split()[1]) for line in (proc / "stat").read_text().splitlines() if line.startswith("btime ")
        )
        fields = (proc / "1" / "stat").read_text().rsplit(")", 1)[1].split()
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5): starttime, in ticks
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def session_limit(platform: str | None, tpu: bool) -> tuple[float, str] | None:
    """The platform's session limit in seconds and its name for the log, or None off Kaggle/Colab.

    >>> session_limit("kaggle", tpu=False), session_limit("kaggle", tpu=True), session_limit(None, tpu=True)
    ((43200.0, "Kaggle's 12 h session limit"), (32400.0, "Kaggle's 9 h TPU session limit"), None)
    """
    if platform not in PLATFORM_LIMITS:
        return None
    if tpu and platform in TPU_LIMITS:
        limit = TPU_LIMITS[platform]
        return limit, f"{PLATFORM_NAMES[platform]}'s {limit / 3600:g} h TPU session limit"
    limit = PLATFORM_LIMITS[platform]
    return limit, f"{PLATFORM_NAMES[platform]}'s {limit / 3600:g} h session limit"


def resolve_deadline(
    value: Any,
    platform: str | None,
    start: float | None,
    now: Callable[[], float] = time.time,
    tpu: bool | None = None,
) -> Deadline | None:
    """The deadline a manager argument means: ``"auto"`` the platform's limit from the session start (None off
    Kaggle/Colab or when the start is unknown), None or ``"off"`` none, a duration string or a number of seconds
    counted from the session start (else from now), a datetime the wall-clock instant (a naive one is local time;
    ConfigError once passed), a :class:`Deadline` itself. ``tpu``: whether this is a TPU session (None: detect it,
    see :func:`syncckpt.env.detect_tpu`), which shortens Kaggle's limit to 9 h.

    >>> resolve_deadline("auto", "kaggle", start=1000.0, now=lambda: 2000.0, tpu=False).at
    44200.0
    >>> resolve_deadline("auto", "kaggle", start=1000.0, now=lambda: 2000.0, tpu=True).at
    33400.0
    >>> resolve_deadline("auto", None, start=1000.0) is None
    True
    >>> resolve_deadline("2h", None, start=None, now=lambda: 50.0).at
    7250.0
    """
    if value is None or value == "off":
        return None
    if isinstance(value, Deadline):
        return value
    if value == "auto":
        if platform not in PLATFORM_LIMITS or start is None:
            return None
        if tpu is None:
            from .env import detect_tpu

            tpu = platform in TPU_LIMITS and detect_tpu()
        limit, why = session_limit(platform, tpu)  # type: ignore[misc]
        if start + limit <= now():  # the session would be over: the start guess is wrong, not the clock
            log.warning(
                "Session deadline off: %s from the guessed session start has passed; set SYNCCKPT_SESSION_START "
                "or deadline=",
                why,
            )
            return None
        return Deadline(start + limit, why)
    if isinstance(value, datetime):
        at = value.timestamp()
        if at <= now():
            raise ConfigError(f"deadline {value.isoformat()}: that time has passed; give a later one, or 'off'")
        return Deadline(at, "the deadline given")
    if isinstance(value, str):
        seconds = parse_duration(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        seconds = float(value)
    else:
        raise ConfigError(f"deadline must be 'auto', 'off', a duration, seconds or a datetime; got {value!r}")
    origin = start if start is not None else now()
    return Deadline(origin + seconds, f"{seconds / 3600:g} h after the session started")
