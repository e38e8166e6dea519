#!/usr/bin/env bash
# Create .venv (once) and install headint with its test dependencies into it.
# torch is pinned first: on CPU machines `torch==2.13.0` is the CPU build; a looser
# requirement would pull a multi-GB CUDA build.
# pip runs only when what is installed differs from what is asked for: the sha256 of
# pyproject.toml plus the torch pin, stored in .venv/.headint-installed after a successful
# install (delete that file, or set HEADINT_REINSTALL=1, to force a reinstall).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_PIN="torch==2.13.0"
EXTRAS="test,minilm"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
STAMP=.venv/.headint-installed
WANT="$( { sha256sum pyproject.toml; echo "$TORCH_PIN [$EXTRAS]"; } | sha256sum | cut -d' ' -f1)"
if [ "${HEADINT_REINSTALL:-0}" != "1" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
        && python -c "import headint, torch" 2>/dev/null; then
    echo "headint: installed packages match pyproject.toml and $TORCH_PIN; skipping pip"
else
    rm -f "$STAMP"
    python -m pip install -q --disable-pip-version-check "$TORCH_PIN"
    python -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
    echo "$WANT" > "$STAMP"
fi
python -c "import torch, transformers, headint; print(f'headint {headint.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
