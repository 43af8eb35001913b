#!/usr/bin/env bash
# Rewrite constraints.txt from the README's two environments (.venv-test and .venv-bench),
# after the test suite and the benchmark both ran green in them.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  cat <<'HEADER'
# The versions the test suite and the benchmark were last green with (pip freeze of the
# README's two environments). The README's commands and .ci/run install with -c constraints.txt;
# scripts/test_newest.sh runs the suite against the newest releases instead. Regenerate with
# scripts/freeze_constraints.sh after a green run of both.
HEADER
  for venv in .venv-test .venv-bench; do
    "$venv/bin/pip" freeze --exclude-editable
  done | grep -v -e '^#' -e '^kronops==' | sed -E 's/^(torch==[^+]+)\+.*/\1/' | sort -fu
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
