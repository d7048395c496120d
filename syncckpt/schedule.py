"""When to save: every N optimizer steps or M minutes, every N epochs, and when the best metric improves.

Plain data in, a decision out: the manager asks at each ``step()`` and ``save_epoch()``; nothing here touches a
clock, a file or a model. A requested final save (SIGTERM) is the lifecycle's decision, not a schedule's.

>>> s = SaveSchedule(every_n_steps=500, every_n_minutes=30)
>>> s.step_due(1000, seconds_since_save=10, last_saved_step=500), s.step_due(1001, 10, 500)
(True, False)
>>> s.step_due(1001, seconds_since_save=1800, last_saved_step=1000)  # the wall-clock trigger
True
>>> s.step_due(1000, seconds_since_save=10, last_saved_step=1000)  # already saved at this step
False
>>> best = BestMetric(SaveSchedule(metric_for_best="f1", mode="max"))
>>> best.consider({"f1": 0.5}), best.consider({"f1": 0.4}), best.consider({"f1": float("nan")})
(True, False, False)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .manifest import Kind

log = logging.getLogger("syncckpt")


@dataclass(frozen=True)
class SaveSchedule:
    """The save triggers; invalid settings raise ConfigError naming the argument."""

    every_n_steps: int | None = 500
    every_n_minutes: float | None = None
    every_n_epochs: int = 1
    metric_for_best: str | None = None
    mode: str = "max"

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ConfigError(f"save_every_n_steps must be >= 1 or None, got {self.every_n_steps}")
        if self.every_n_minutes is not None and self.every_n_minutes <= 0:
            raise ConfigError(f"save_every_n_minutes must be > 0 or None, got {self.every_n_minutes}")
        if self.every_n_epochs < 1:
            raise ConfigError("keep_last must be >= 1, keep_epochs >= 0 and save_every_n_epochs >= 1")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"mode must be 'max' or 'min', got {self.mode!r}")

    def minutes_due(self, seconds_since_save: float) -> bool:
        """The wall-clock trigger alone (every rank must agree on it before acting)."""
        return bool(self.every_n_minutes) and seconds_since_save >= self.every_n_minutes * 60  # type: ignore[operator]

    def step_due(
        self, global_step: int, seconds_since_save: float, last_saved_step: int | None, *, timed: bool | None = None
    ) -> bool:
        """Whether a step checkpoint is due after optimizer step ``global_step``. ``timed``: the agreed wall-clock
        decision, when the ranks agreed on one."""
        timed = self.minutes_due(seconds_since_save) if timed is None else timed
        due = timed or bool(self.every_n_steps and global_step % self.every_n_steps == 0)
        return due and global_step != last_saved_step

    def next_due(self, global_step: int | None, seconds_since_save: float) -> str:
        """When the next step checkpoint falls due, in words (for a status line).

        >>> SaveSchedule(every_n_steps=500, every_n_minutes=20).next_due(1234, seconds_since_save=300)
        'step 1500 or in 15 min'
        >>> SaveSchedule(every_n_steps=None).next_due(7, 0)
        'at epoch end'
        """
        due = []
        if self.every_n_steps:
            at = ((global_step or 0) // self.every_n_steps + 1) * self.every_n_steps
            due.append(f"step {at}")
        if self.every_n_minutes:
            due.append(f"in {max(0.0, self.every_n_minutes - seconds_since_save / 60):.0f} min")
        return " or ".join(due) or "at epoch end"

    def epoch_kinds(self, epoch: int, improves_best: bool) -> list[Kind]:
        """What to write at the end of ``epoch``: an epoch checkpoint every N epochs, and best_model."""
        kinds: list[Kind] = ["epoch"] if (epoch + 1) % self.every_n_epochs == 0 else []
        return kinds + (["best"] if improves_best else [])

    def better(self, value: float, bar: float | None) -> bool:
        if value != value:  # NaN never improves
            return False
        return bar is None or (value > bar if self.mode == "max" else value < bar)


class BestMetric:
    """The bar best_model must beat: the committed best, or a better candidate whose save is under way."""

    def __init__(self, schedule: SaveSchedule) -> None:
        self.schedule = schedule
        self.best: float | None = None
        self._candidate: float | None = None
        self._warned = False

    @property
    def bar(self) -> float | None:
        return self._candidate if self._candidate is not None else self.best

    def consider(self, metrics: dict[str, Any] | None) -> bool:
        """Whether ``metrics`` beat the bar; the value becomes the candidate until its save lands or fails."""
        name = self.schedule.metric_for_best
        if not name:
            return False
        value = (metrics or {}).get(name)
        if value is None:
            if not self._warned:
                log.warning(
                    "metric_for_best %r is not in the metrics passed to save_epoch (%s); best_model is not updated",
                    name,
                    sorted(metrics or {}),
                )
                self._warned = True
            return False
        value = float(value.item() if hasattr(value, "item") else value)
        if not self.schedule.better(value, self.bar):
            return False
        self._candidate = value
        return True

    def landed(self, value: float | None) -> None:
        """best_model with ``value`` is committed: it is the bar now."""
        self.best = value

    def lost(self) -> None:
        """A best_model save failed: a value that never landed does not raise the bar."""
        self._candidate = self.best
