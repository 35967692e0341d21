#!/usr/bin/env bash
# The test command: sets up the environment, then runs the whole suite on CPU
# (Triton kernels under TRITON_INTERPRET=1; CUDA tests skip with a reason
# where no GPU is present; every csrc/ file is compiled with nvcc when nvcc is found).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh triton,editing,test
python -m pytest tests "$@"
