#!/usr/bin/env bash
# Install syncckpt with everything its demo and tests need, on a fresh machine.
# torch is pinned first: a bare `torch` requirement would make pip fetch a multi-GB CUDA build, while
# torch==2.13.0 takes the CPU wheel. The package itself only asks for a range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[${SYNCCKPT_EXTRAS:-test}]"
