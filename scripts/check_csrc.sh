#!/usr/bin/env bash
# Build, link and import sphere_fast._C for sm_90a on a machine without a GPU
# (what CI runs as part of scripts/test.sh): fetch the CUDA header / library /
# toolchain wheels once, then run tests/csrc/test_csrc_compile.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$(bash "$here/scripts/cuda_wheels.sh")"
cd "$here"
PYTHONPATH="$dest${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m pytest -q tests/csrc/test_csrc_compile.py "$@"
