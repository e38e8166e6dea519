#!/usr/bin/env bash
# The GPU check of headint (scripts/gpu_check.py): on one H100-class GPU it finishes in under
# 8 minutes and writes one JSON - Triton correctness for every operand, intervened vs plain
# Triton vs SDPA flash at T = 1k..16k, the all-heads scan vs the hook loop.
#
#   bash scripts/gpu_check.sh [OUT.json] [more gpu_check.py arguments]   (default OUT: gpu_check.json)
#   PYTHON=/path/to/python bash scripts/gpu_check.sh                      # a Python with CUDA torch + triton
#   bash scripts/gpu_check.sh /tmp/x.json --dry-run --lengths 16          # CPU: test the script
#
# It needs a Python whose torch has CUDA, with triton and transformers: $PYTHON, else the
# checkout's .venv/bin/python, else python3 (scripts/setup.sh installs a CPU torch in .venv: on a
# GPU machine point PYTHON at an environment with a CUDA torch). headint and its Triton kernels
# are taken from this checkout (PYTHONPATH), so nothing needs installing. A hard limit of 8 minutes (GPU_CHECK_TIMEOUT_S, default 480) stops it
# whatever happens; the JSON is rewritten after every step, so a stopped run keeps what it did.
set -euo pipefail
cd "$(dirname "$0")/.."
out="gpu_check.json"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    out="$1"
    shift
fi
if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check: $("$py" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, "cuda", torch.cuda.is_available())')" >&2
exec timeout --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-480}" "$py" scripts/gpu_check.py --out "$out" "$@"
