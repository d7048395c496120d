"""What the ``syncckpt`` command's modules share: exit codes, the usage error, the run context and text helpers.

>>> human_size(999), human_size(1_500_000)
('999 B', '1.5 MB')
>>> print(table(["a", "bb"], [["1", "2"], ["333", "4"]]))
a    bb
1    2
333  4
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import SyncCkptError
from .manifest import parse_checkpoint_name
from .remote import Remote, open_remote

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


class UsageError(SyncCkptError):
    """A command line that parsed but makes no sense (exit status 2)."""


@dataclass
class Context:
    """One run of the command: storage options, output mode, and the scrubber every printed line goes through."""

    options: dict[str, Any]
    as_json: bool
    verbose: bool
    scrub: Callable[[str], str]

    def emit(self, obj: dict[str, Any], text: str | None) -> None:
        """The result of a command: JSON or text on stdout, never carrying a storage option value."""
        line = json.dumps(obj, sort_keys=True) if self.as_json else text
        if line is not None:
            print(self.scrub(line), flush=True)

    def open(self, url: str) -> Remote:
        """The remote at ``url``, opened with the command's storage options."""
        return open_remote(url, self.options or None)


def parse_storage_options(items: list[str], *, flag: str = "--storage-option") -> dict[str, Any]:
    """``KEY=VALUE`` items of a repeatable flag (the CLI's and the trainer's) as storage options; VALUE is
    JSON-decoded where it is valid JSON; a VALUE that opens a JSON object or list (``{``, ``[``) must be valid
    JSON. A malformed item is a UsageError that never echoes the value (it may be a secret).

    >>> parse_storage_options(["anon=true", 'client_kwargs={"endpoint_url": "http://127.0.0.1:9000"}', "key=AK"])
    {'anon': True, 'client_kwargs': {'endpoint_url': 'http://127.0.0.1:9000'}, 'key': 'AK'}
    >>> try:
    ...     parse_storage_options(['client_kwargs={"region_name": "eu"'])
    ... except UsageError as e:
    ...     print(e)
    --storage-option client_kwargs=...: not valid JSON (Expecting ',' delimiter at character 20)
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got {key!r} without '='")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError as e:
            if value.lstrip()[:1] in ("{", "["):
                raise UsageError(f"{flag} {key}=...: not valid JSON ({e.msg} at character {e.pos})") from None
            out[key] = value
    return out


def check_name(name: str, what: str) -> str:
    """``name`` when it is a checkpoint name, else a UsageError naming the option it came from."""
    if parse_checkpoint_name(name) is None:
        raise UsageError(
            f"{what} {name!r} is not a checkpoint name (checkpoint-step-N, checkpoint-epoch-N, "
            "checkpoint-N or best_model)"
        )
    return name


def keep_epochs(value: int | None) -> int:
    """--keep-epochs for retention: without the option every epoch checkpoint stays."""
    return value if value is not None else 1 << 30


def human_size(n: int) -> str:
    """Bytes in decimal units, one decimal place."""
    if n < 1000:
        return f"{n} B"
    size = float(n)
    for unit in ("kB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000 or unit == "TB":
            break
    return f"{size:.1f} {unit}"


def iso(ts: float) -> str:
    """A Unix time as ISO 8601 UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def table(headers: list[str], rows: list[list[str]], gap: int = 2) -> str:
    """Left-aligned columns ``gap`` spaces apart, without trailing blanks."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    sep = " " * gap
    lines = [sep.join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def fitting_table(headers: list[str], variants: list[list[list[str]]], width: int) -> str:
    """The first of ``variants`` (the same rows, each shorter than the one before) that fits ``width`` columns
    with two spaces between columns, then one; the last, one space apart, when none fits.

    >>> print(fitting_table(["when"], [[["2026-12-02 01:27:23"]], [["2026-12-02"]]], width=12))
    when
    2026-12-02
    """
    for gap in (2, 1):
        for rows in variants:
            text = table(headers, rows, gap)
            if max(map(len, text.splitlines())) <= width:
                return text
    return table(headers, variants[-1], 1)
