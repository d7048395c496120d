"""``python -m syncckpt``: the ``syncckpt`` command, for environments where the console script is not on PATH
(a notebook's kernel, an unpacked source archive)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
