#!/usr/bin/env python
"""The original write-up's name for ``scripts/train_hallucination.py``, kept so notebook cells written from it run
unchanged: same flags, same behaviour (automatic resume by default, ``--resume-from`` for a chosen checkpoint)."""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).with_name("train_hallucination.py")), run_name="__main__")
