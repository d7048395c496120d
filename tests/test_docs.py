"""The documentation's code runs as written: every ```python block of docs/ARCHITECTURE.md, and every block of the
README marked ``<!-- runnable ... -->``, is executed (the README's, twice: the second run is a session that
resumes). The README's framework and cloud snippets are executed by their own tests, with the bucket swapped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
README = DOCS.parent / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
RUNNABLE = re.compile(r"^<!-- runnable[^>]*-->\n```python\n(.*?)^```", re.S | re.M)


def blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


@pytest.mark.parametrize("i", range(len(blocks(DOCS / "ARCHITECTURE.md"))))
def test_architecture_examples_run(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks(DOCS / "ARCHITECTURE.md")[i], f"ARCHITECTURE.md block {i}", "exec"), {"__name__": "doc"})


def test_every_document_has_an_example_to_run():
    assert blocks(DOCS / "ARCHITECTURE.md")


@pytest.mark.parametrize("i", range(len(RUNNABLE.findall(README.read_text()))))
def test_readme_runnable_blocks_run_as_written_and_a_second_session_resumes(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compile(RUNNABLE.findall(README.read_text())[i], f"README.md runnable block {i}", "exec")
    first: dict = {"__name__": "readme"}
    exec(code, first)
    second: dict = {"__name__": "readme"}
    exec(code, second)
    if "info" in second:  # a block that resumes: the second session continues where the first stopped
        assert first["info"] is None and second["info"] is not None
        assert second["info"].global_step == first["global_step"]


def test_the_readme_marks_its_api_loop_runnable():
    assert "mgr = CheckpointManager(" in RUNNABLE.findall(README.read_text())[0]
