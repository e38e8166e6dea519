# Sourced by setup.sh, test.sh and demo.sh: which virtual environment they use.
#   default                    .venv         the exact versions of constraints.txt (what the suite was last
#                                            run against; CI uses them)
#   HEADINT_CONSTRAINTS=latest .venv-latest  the newest releases pip resolves today (torch stays pinned)
case "${HEADINT_CONSTRAINTS:-pinned}" in
    pinned) VENV=.venv ;;
    latest) VENV=.venv-latest ;;
    *) echo "HEADINT_CONSTRAINTS must be 'latest' or unset, got '${HEADINT_CONSTRAINTS}'" >&2; exit 2 ;;
esac
