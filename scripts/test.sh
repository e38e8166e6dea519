#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the slow tests. The versions of constraints.txt by
# default; `HEADINT_CONSTRAINTS=latest bash scripts/test.sh` runs against the newest releases.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
bash scripts/setup.sh
. "$VENV/bin/activate"
exec python -m pytest -q -n 2 "$@"
