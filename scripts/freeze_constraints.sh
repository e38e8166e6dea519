#!/usr/bin/env bash
# Write the versions installed in the environment (by default .venv-latest, after
# `HEADINT_CONSTRAINTS=latest bash scripts/test.sh` passed) to constraints.txt, which
# scripts/setup.sh then installs into .venv (and CI). Update the versions the README states too
# (tests/test_repo_root.py checks they agree).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-latest}
{
    echo "# The exact versions the test suite was last run against (bash scripts/test.sh; written by"
    echo "# scripts/freeze_constraints.sh from $VENV on $(date -u +%Y-%m-%d), Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())')). scripts/setup.sh installs"
    echo "# headint into .venv with -c constraints.txt, and so does CI; HEADINT_CONSTRAINTS=latest uses the"
    echo "# newest releases in .venv-latest instead."
    "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | sed -e 's/+[A-Za-z0-9.]*$//'
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
