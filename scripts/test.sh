#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the slow tests. The versions of constraints.txt by
# default; `HEADINT_CONSTRAINTS=latest bash scripts/test.sh` runs against the newest releases.
# Two lanes, one after the other (see tests/conftest.py): the native lane (no TRITON_INTERPRET),
# then the Triton-interpreter lane (TRITON_INTERPRET=1: tests/backends, tests/triton, tests/ops).
# Each collects only its own tests; a lane the arguments leave without tests (pytest's exit 5)
# is no failure when the other lane ran tests.
# Each lane ends with its 25 slowest test phases (--durations; a later --durations=N in the
# arguments overrides it), so CI's log shows where the suite's time goes.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
bash scripts/setup.sh
. "$VENV/bin/activate"
set +e
echo "== headint tests, native lane"
env -u TRITON_INTERPRET python -m pytest -q -n 2 --durations=25 "$@"
native=$?
echo "== headint tests, Triton interpreter lane (native lane exit $native)"
TRITON_INTERPRET=1 python -m pytest -q -n 2 --durations=25 "$@"
interpreter=$?
set -e
if [ "$native" = 5 ] && [ "$interpreter" = 5 ]; then exit 5; fi
for rc in "$native" "$interpreter"; do
    if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then exit "$rc"; fi
done
exit 0
