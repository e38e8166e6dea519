#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: a causal scan of the embedded
# induction model. Extra arguments go to `headint demo` (see `headint demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec headint demo "$@"
