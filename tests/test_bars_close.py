"""A log line written while a bar closes lands after the bar's last line, not inside it.

tqdm's close() takes the bar off its list of drawn bars before it draws the bar's last line and newline; a
``tqdm.write`` from another thread in between finds no bar to clear and prints at the end of the bar's text
(seen as ``60/60 [...]2026-12-03 ... Removed old checkpoint`` in a notebook). The test makes that moment happen:
the log line is written from a thread started inside ``_decr_instances``."""

from __future__ import annotations

import io
import logging
import re
import sys
import threading

from tqdm import tqdm as std_tqdm

from syncckpt import _bars


def test_a_log_line_written_while_the_bar_closes_lands_after_its_last_line(monkeypatch) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stderr", screen)
    console = logging.StreamHandler(screen)
    console.setFormatter(logging.Formatter("LOG %(message)s"))
    log = logging.getLogger("syncckpt")
    log.addHandler(console)
    monkeypatch.setattr(log, "level", logging.INFO)
    writers: list[threading.Thread] = []
    original = std_tqdm._decr_instances.__func__  # type: ignore[attr-defined]

    def decr(cls, instance):  # type: ignore[no-untyped-def]
        original(cls, instance)
        t = threading.Thread(target=log.info, args=("Removed old checkpoint checkpoint-step-40",))
        writers.append(t)
        t.start()
        t.join(0.5)  # with the fix it waits on tqdm's lock until close() has drawn the last line

    monkeypatch.setattr(std_tqdm, "_decr_instances", classmethod(decr))
    try:
        with _bars.progress(total=3, desc="epoch 1/1", file=screen, disable=False, mininterval=0) as bar:
            bar.update(3)
    finally:
        for t in writers:
            t.join()
        log.removeHandler(console)
    shown = screen.getvalue()
    assert "Removed old checkpoint" in shown
    assert re.search(r"(^|[\r\n])LOG Removed old checkpoint", shown), repr(shown)
    assert "]LOG" not in shown, repr(shown)
