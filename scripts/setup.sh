#!/usr/bin/env bash
# Install syncckpt with everything its demo and tests need, on a fresh machine or in a fresh virtualenv:
#   bash scripts/setup.sh                            # python3 on PATH (the machine's, or an activated venv's)
#   PYTHON=.venv/bin/python bash scripts/setup.sh    # a given interpreter
# SYNCCKPT_EXTRAS picks the extras (default: test).
# torch is pinned first: a bare `torch` requirement would make pip fetch a multi-GB CUDA build, while
# torch==2.13.0 takes the CPU wheel. The package itself only asks for a range; constraints.txt keeps the second
# step from replacing the CPU torch (issue 18) and from backtracking for minutes over boto3.
set -euo pipefail
PY="${PYTHON:-python3}"
if [[ "$PY" == */* ]]; then PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"; fi  # relative to the caller
cd "$(dirname "$0")/.."
start=$SECONDS
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check -c constraints.txt "$@"; }
pip_install "torch==2.13.0"
pip_install -e ".[${SYNCCKPT_EXTRAS:-test}]"
interpreter=$("$PY" -c 'import sys; print(sys.executable)')
torch_version=$("$PY" -c 'import torch; print(torch.__version__ if torch.version.cuda is None else torch.__version__ + " (CUDA)")' \
    2>/dev/null) || torch_version="not importable"
if [[ "$torch_version" != "2.13.0+cpu" ]]; then
    echo "setup.sh: torch is $torch_version in $interpreter after the install, expected 2.13.0+cpu (the CPU wheel; see constraints.txt)" >&2
    exit 1
fi
echo "setup.sh: installed syncckpt[${SYNCCKPT_EXTRAS:-test}] with torch $torch_version into $interpreter in $((SECONDS - start)) s"
