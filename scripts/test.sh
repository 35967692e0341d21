#!/usr/bin/env bash
# The test command: sets up the environment, then runs the whole suite on CPU.
# Triton kernels run under TRITON_INTERPRET=1; CUDA tests skip with a reason
# where no GPU is present; the CUDA extension is built, linked and imported
# for sm_90a (the CUDA headers and libraries come from pip wheels cached
# outside the repo, see scripts/cuda_wheels.sh; SPHERE_FAST_SKIP_CSRC=1 skips
# fetching them).
#
# Then the Triton kernel tests (interpreter and sm_90/sm_80 compile tests) run
# a second time against the oldest supported Triton, the GPU machine's
# (setup.py allows >=3.6,<3.10; the environment gets the newest). It is
# installed once, without dependencies, into a folder outside the repo that
# goes first on PYTHONPATH, with numpy < 2.4: Triton 3.6's interpreter turns
# 1-element arrays into ints, which numpy 2.4 refuses. On an AVX2 machine this
# pass also forces OpenBLAS's Haswell kernels (the interpreter's tl.dot is
# numpy's matmul; those kernels round some entries in another order than the
# AVX-512 ones), so no test relies on one rounding order of the dot.
# SPHERE_FAST_SKIP_OLDEST_TRITON=1 skips this second pass.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh triton,editing,test
if [ "${SPHERE_FAST_SKIP_CSRC:-0}" != "1" ]; then
  wheels="$(bash scripts/cuda_wheels.sh)"
  export PYTHONPATH="$wheels${PYTHONPATH:+:$PYTHONPATH}"
fi
triton_version() { python -c 'import triton, numpy; print(f"triton {triton.__version__}, numpy {numpy.__version__}")'; }

echo "[test] whole suite with $(triton_version)"
status=0
python -m pytest tests "$@" || status=$?

if [ "${SPHERE_FAST_SKIP_OLDEST_TRITON:-0}" != "1" ]; then
  oldest=3.6.0
  folder="${XDG_CACHE_HOME:-$HOME/.cache}/sphere_fast/triton-$oldest"
  if [ ! -f "$folder/.installed" ]; then
    echo "[test] installing triton==$oldest and numpy<2.4 into $folder"
    rm -rf "$folder"
    python -m pip install --quiet --no-deps --no-compile --target "$folder" "triton==$oldest" "numpy<2.4"
    touch "$folder/.installed"
  fi
  blas=()
  if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then blas=(OPENBLAS_CORETYPE=Haswell); fi
  echo "[test] Triton kernel tests again with $(PYTHONPATH="$folder${PYTHONPATH:+:$PYTHONPATH}" triton_version) ${blas[*]:-}"
  kernel_status=0
  env ${blas[@]+"${blas[@]}"} PYTHONPATH="$folder${PYTHONPATH:+:$PYTHONPATH}" python -m pytest tests/kernels \
    -W "ignore:Conversion of an array with ndim > 0:DeprecationWarning" "$@" || kernel_status=$?
  # 5: the arguments selected no kernel test
  if [ "$kernel_status" != 0 ] && [ "$kernel_status" != 5 ] && [ "$status" = 0 ]; then
    status=$kernel_status
  fi
fi
exit "$status"
