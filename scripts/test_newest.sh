#!/usr/bin/env bash
# The test suite against the newest release of every dependency (constraints.txt not applied),
# so that a release that breaks kronops (as transformers 5.25 did, by depending on a package
# named `kernels`) shows the day it appears. Not part of CI's pass/fail. torch stays 2.13.0:
# on machines without a GPU that is the local CPU wheel, and an unpinned torch pulls a CUDA build.
# Prints the versions that differ from constraints.txt, then runs pytest (arguments passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-newest
.venv-newest/bin/pip install -q --upgrade torch==2.13.0 -e '.[test,native]'
.venv-newest/bin/python -m kronops.native build
echo "newer than constraints.txt:"
.venv-newest/bin/pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' \
  | grep -v -x -F -f constraints.txt || echo "  (nothing)"
.venv-newest/bin/python -m pytest -q "$@"
