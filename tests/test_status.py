"""status_line (syncckpt/status.py): each branch of the one-line status a notebook cell prints.

The status dicts are what ``CheckpointManager.status()`` returns (the writer's keys, plus the uploader's with a
remote); the manager-level case (nothing uploading) is in tests/test_manager.py.
"""

from __future__ import annotations

import pytest

from syncckpt.status import size_text, status_line

MB = 1000**2


def mirrored_status(**changes):
    """A mirrored run at rest: step 500 committed and mirrored, nothing queued, no errors."""
    st = {
        "last_committed": "checkpoint-step-500",
        "saves_in_progress": 0,
        "save_error": None,
        "remote": "s3://b/run",
        "mirrored": ["checkpoint-step-500"],
        "pending": [],
        "uploading": None,
        "bytes_pending": 0,
        "last_upload_error": None,
        "mirroring_stopped": None,
    }
    st.update(changes)
    return st


def test_bytes_in_flight_name_the_checkpoint_uploading_then_the_queued_ones():
    st = mirrored_status(
        last_committed="checkpoint-step-1500",
        uploading="checkpoint-step-1000",
        pending=["checkpoint-step-1500"],
        bytes_pending=2 * 440 * MB + 123,
    )
    assert status_line(st, "step 2000") == (
        "syncckpt: committed checkpoint-step-1500 | mirrored checkpoint-step-500 | uploading "
        "checkpoint-step-1000, checkpoint-step-1500 (880.0 MB) | next save step 2000"
    )
    # only queued, nothing started yet (the uploader is between two uploads)
    line = status_line(mirrored_status(pending=["checkpoint-step-1000"], bytes_pending=1_500_000_000), "in 3 min")
    assert "| uploading checkpoint-step-1000 (1.5 GB) |" in line


@pytest.mark.parametrize(
    "n, shown", [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (12_345_678, "12.3 MB"), (3 * 10**12, "3000.0 GB")]
)
def test_sizes_are_in_decimal_units_up_to_gb(n, shown):
    assert size_text(n) == shown


def test_a_save_in_progress_and_a_failing_save_are_said():
    st = mirrored_status(saves_in_progress=1)
    assert status_line(st, "step 1000").startswith("syncckpt: committed checkpoint-step-500 (+1 saving) | mirrored")
    error = "checkpoint-step-1000: [Errno 28] No space left on device"
    line = status_line(mirrored_status(save_error=error), "step 1500")
    assert line == (
        f"syncckpt: committed checkpoint-step-500 | SAVE FAILING: {error} | mirrored checkpoint-step-500 | "
        "uploading none | next save step 1500"
    )


def test_an_upload_error_is_said_while_a_retry_is_pending_and_not_once_the_queue_drained():
    error = "ConnectionError: endpoint unreachable"
    retrying = mirrored_status(uploading="checkpoint-step-1000", bytes_pending=4 * MB, last_upload_error=error)
    assert status_line(retrying, "step 1500").endswith(
        f"| uploading checkpoint-step-1000 (4.0 MB) | retrying after: {error} | next save step 1500"
    )
    # the error of an upload that later went through is history: nothing is waiting on it
    drained = mirrored_status(mirrored=["checkpoint-step-500", "checkpoint-step-1000"], last_upload_error=error)
    assert "retrying" not in status_line(drained, "step 1500")
    assert "| mirrored checkpoint-step-1000 | uploading none |" in status_line(drained, "step 1500")


def test_mirroring_stopped_is_said_and_replaces_the_retry_note():
    stopped = "checkpoint-step-1000: upload failed for good after 8 attempts (on_upload_error='warn')"
    st = mirrored_status(
        uploading="checkpoint-step-1000", bytes_pending=4 * MB, last_upload_error="timeout", mirroring_stopped=stopped
    )
    line = status_line(st, "step 1500")
    assert f"| MIRRORING STOPPED: {stopped} | next save step 1500" in line
    assert "retrying after" not in line
    # stopped with nothing queued is still said: new checkpoints are not being mirrored
    assert "MIRRORING STOPPED" in status_line(mirrored_status(mirroring_stopped=stopped), "step 1500")


def test_without_a_remote_there_is_no_mirror_part():
    st = {"last_committed": None, "saves_in_progress": 0, "save_error": None}
    assert status_line(st, "step 500") == "syncckpt: committed none yet | next save step 500"
