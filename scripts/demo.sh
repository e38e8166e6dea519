#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: a causal scan of the embedded
# induction model. Extra arguments go to `headint demo` (see `headint demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
bash scripts/setup.sh
. "$VENV/bin/activate"
exec headint demo "$@"
