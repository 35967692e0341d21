#!/usr/bin/env bash
# The test command: sets up the environment, then runs the whole suite on CPU.
# Triton kernels run under TRITON_INTERPRET=1; CUDA tests skip with a reason
# where no GPU is present; the CUDA extension is built, linked and imported
# for sm_90a (the CUDA headers and libraries come from pip wheels cached
# outside the repo, see scripts/cuda_wheels.sh; SPHERE_FAST_SKIP_CSRC=1 skips
# fetching them).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh triton,editing,test
if [ "${SPHERE_FAST_SKIP_CSRC:-0}" != "1" ]; then
  wheels="$(bash scripts/cuda_wheels.sh)"
  export PYTHONPATH="$wheels${PYTHONPATH:+:$PYTHONPATH}"
fi
python -m pytest tests "$@"
