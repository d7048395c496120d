"""syncckpt's progress bars, with console log lines printed above them, never into them (issue 18).

While a bar is drawn, the uploader, the writer and the caller's own threads keep logging. A log line written to the
terminal between two redraws of a bar lands inside the bar's line (``pull ck  37%|███▋  | Checkpoint committed``).
:func:`progress` draws the bar and, while it is shown, sends the console handlers of the ``syncckpt`` logger and
of the root logger through ``tqdm.write``: it clears the bars, prints the line, and draws them again, under tqdm's
lock, which the bars take to redraw too. Same formatter, level, filters and stream as the handler it stands in for;
other handlers (files, pytest's capture) are left alone. Nested and concurrent bars share one redirection: the
first bar to open installs it, the last to close puts the original handlers back.

>>> import io
>>> console = logging.StreamHandler(sys.stderr)
>>> logging.getLogger("syncckpt").addHandler(console)
>>> with progress(total=3, desc="demo", file=io.StringIO(), disable=False) as bar:
...     bar.update(3)
...     [type(h).__name__ for h in logging.getLogger("syncckpt").handlers if not h.name]
['_AboveTheBars']
>>> logging.getLogger("syncckpt").handlers[-1] is console
True
>>> logging.getLogger("syncckpt").removeHandler(console)
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm as std_tqdm

_LOGGERS = ("syncckpt", None)  # None: the root logger
_lock = threading.Lock()
_open = 0


@contextlib.contextmanager
def progress(tqdm_class: type[std_tqdm] = std_tqdm, **kwargs: Any) -> Iterator[std_tqdm]:
    """``tqdm_class(**kwargs)`` as a context manager; console logging goes through ``tqdm.write`` while it is
    shown (a disabled bar draws nothing, so nothing is redirected)."""
    with tqdm_class(**kwargs) as bar:
        if bar.disable:
            yield bar
            return
        _redirect()
        try:
            yield bar
        finally:
            # Closed before the handlers go back, and under tqdm's lock: close() takes the bar off tqdm's list
            # before it draws its last line, and a log line written in between would land in that line.
            with tqdm_class.get_lock():
                bar.close()
            _restore()


class _AboveTheBars(logging.Handler):
    """Stands in for a console handler: formats and filters as it does, writes through ``tqdm.write``."""

    def __init__(self, inner: logging.StreamHandler) -> None:  # type: ignore[type-arg]
        super().__init__(inner.level)
        self.inner = inner

    def filter(self, record: logging.LogRecord) -> bool | logging.LogRecord:
        return self.inner.filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # std tqdm's write clears every bar (notebook ones included: they share its instances) on either stream
            std_tqdm.write(self.inner.format(record), file=self.inner.stream)
            self.inner.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)


def _redirect() -> None:
    global _open
    with _lock:
        _open += 1
        if _open > 1:
            return
        for name in _LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers = [_AboveTheBars(h) if _is_console(h) else h for h in logger.handlers]  # type: ignore[arg-type]


def _restore() -> None:
    global _open
    with _lock:
        _open -= 1
        if _open:
            return
        for name in _LOGGERS:  # handlers added or removed meanwhile stay added or removed
            logger = logging.getLogger(name)
            logger.handlers = [h.inner if isinstance(h, _AboveTheBars) else h for h in logger.handlers]
