#!/usr/bin/env bash
# Plant known bugs in a copy of the checkout and check that the suite catches each one
# (scripts/mutation_check.py says how). Needs the .venv of `make test`; not run by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" scripts/mutation_check.py "$@"
