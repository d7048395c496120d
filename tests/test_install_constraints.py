"""The install path stays on the CPU torch (issue 18): static checks of constraints.txt, scripts/setup.sh and .ci/run.

Without the constraints, `pip install -e ".[test]"` after `pip install torch==2.13.0` backtracks over boto3 (from
moto[server]) for minutes and replaces the CPU torch with the newest CUDA build on the index.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _constraints() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower()
            out[name] = line[len(name) :].strip()
    return out


def test_constraints_pin_cpu_torch_inside_the_package_range():
    from packaging.requirements import Requirement

    constraints = _constraints()
    assert constraints["torch"] == "==2.13.0"
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert not any(s.operator in ("==", "===") for s in torch_req.specifier), "the package keeps a torch range"
    assert torch_req.specifier.contains("2.13.0+cpu")


def test_boto3_and_botocore_are_capped_together():
    constraints = _constraints()
    assert constraints["boto3"].startswith("<")
    assert constraints["boto3"] == constraints["botocore"]


def test_setup_installs_through_the_constraints_and_checks_torch():
    text = (REPO / "scripts" / "setup.sh").read_text()
    code = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert code[0].startswith("set -euo pipefail")
    installs = [line for line in code if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert "2.13.0+cpu" in text and "exit 1" in text


def test_ci_runs_the_readme_commands_in_a_fresh_venv_and_ends_with_pytest():
    text = (REPO / ".ci" / "run").read_text()
    code = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "set -euo pipefail" in code
    assert any(shlex.split(line)[:3] == ["python3", "-m", "venv"] for line in code)
    assert "bash scripts/setup.sh" in code
    assert "2.13.0+cpu" in text
    # the README's test command, last: its exit status (1, or 5 for no tests) is the script's
    readme = (REPO / "README.md").read_text()
    test_command = readme.split("# run the tests\n", 1)[1].splitlines()[0].split(" && ", 1)[1]
    assert test_command.startswith("python -m pytest")
    assert code[-1] == test_command
