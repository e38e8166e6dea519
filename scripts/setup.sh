#!/usr/bin/env bash
# Create .venv (once) and install headint with its test dependencies into it.
# torch is pinned first: on CPU machines `torch==2.13.0` is the CPU build; a looser
# requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -e ".[test,minilm]"
python -c "import torch, transformers, headint; print(f'headint {headint.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
