"""The documentation's code runs as written: every ```python block of docs/ARCHITECTURE.md is executed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


@pytest.mark.parametrize("i", range(len(blocks(DOCS / "ARCHITECTURE.md"))))
def test_architecture_examples_run(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks(DOCS / "ARCHITECTURE.md")[i], f"ARCHITECTURE.md block {i}", "exec"), {"__name__": "doc"})


def test_every_document_has_an_example_to_run():
    assert blocks(DOCS / "ARCHITECTURE.md")
