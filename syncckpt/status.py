"""Where a run's checkpoint work stands: :func:`combined_status` and :func:`wait_all` over a writer and its
uploader (the manager's and the Lightning plugin's ``status()``/``wait()``), and :func:`status_line`, one line of
it for a notebook cell or a log.

>>> print(status_line({"last_committed": "checkpoint-step-500", "saves_in_progress": 0, "save_error": None,
...                    "remote": "s3://b/run", "mirrored": ["checkpoint-step-500"], "pending": [],
...                    "uploading": None, "bytes_pending": 0, "last_upload_error": None}, "step 1000"))
syncckpt: committed checkpoint-step-500 | mirrored checkpoint-step-500 | uploading none | next save step 1000
"""

from __future__ import annotations

import time
from typing import Any


def combined_status(writer: Any, uploader: Any) -> dict[str, Any]:
    """The writer's status (committed, saving, errors), with the uploader's (mirrored, pending) when mirroring."""
    st = writer.status()
    if uploader is not None:
        st.update(uploader.status())
    return st


def wait_all(writer: Any, uploader: Any, timeout: float | None) -> bool:
    """Block until every started save is committed and, when mirroring, mirrored; True when all done within
    ``timeout`` seconds (None: no limit). Raises the mirror's error when it failed and ``on_upload_error="raise"``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if not writer.wait(timeout):
        return False
    if uploader is None:
        return True
    done = uploader.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
    uploader.raise_if_failed()
    return bool(done)


def size_text(n: int) -> str:
    """Bytes in the largest unit that keeps the number under 1000 (decimal units, as the README uses)."""
    size, unit = float(n), "B"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            break
        size /= 1000
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def status_line(st: dict[str, Any], next_due: str) -> str:
    """Last committed, last mirrored, what is uploading (checkpoints and bytes), errors, and the next save."""
    parts = [f"committed {st.get('last_committed') or 'none yet'}"]
    if st.get("saves_in_progress"):
        parts[0] += f" (+{st['saves_in_progress']} saving)"
    if st.get("save_error"):
        parts.append(f"SAVE FAILING: {st['save_error']}")
    if "remote" in st:
        mirrored = st.get("mirrored") or []
        parts.append(f"mirrored {mirrored[-1] if mirrored else 'none yet'}")
        queued = [n for n in [st.get("uploading"), *st.get("pending", [])] if n]
        parts.append(
            f"uploading {', '.join(queued)} ({size_text(st.get('bytes_pending', 0))})" if queued else "uploading none"
        )
        if st.get("mirroring_stopped"):
            parts.append(f"MIRRORING STOPPED: {st['mirroring_stopped']}")
        elif st.get("last_upload_error") and queued:
            parts.append(f"retrying after: {st['last_upload_error']}")
    parts.append(f"next save {next_due}")
    return "syncckpt: " + " | ".join(parts)
