#!/usr/bin/env bash
# Compile-check csrc/ for sm_90a on a machine without a GPU (CI).
#
# Installs the CUDA 13 cuBLAS/cuSOLVER wheels (headers) -- and, when no nvcc is
# found, the nvcc toolchain wheels -- into a cache folder outside the repo,
# puts it on PYTHONPATH so the `nvidia` namespace package resolves to it, and
# runs tests/test_csrc_compile.py. Downloads: ~622 MB for the headers
# (nvidia-cublas 421 MB, nvidia-cusolver 201 MB), ~104 MB more for nvcc.
#
#   scripts/check_csrc.sh            # uses $SPHERE_FAST_CUDA_WHEELS or ~/.cache/sphere_fast/cuda-wheels
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${SPHERE_FAST_CUDA_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/sphere_fast/cuda-wheels}"
python="${PYTHON:-python3}"

headers=(nvidia-cublas==13.0.2.14 nvidia-cusolver==12.0.4.66)
toolchain=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
           nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)

need=()
if ! ls "$dest"/nvidia/*/include/cublas_v2.h >/dev/null 2>&1 || ! ls "$dest"/nvidia/*/include/cusolverDn.h >/dev/null 2>&1; then
  need+=("${headers[@]}")
fi
have_nvcc() {
  [[ -n "${CUDACXX:-}" && -x "${CUDACXX}" ]] && return 0
  [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]] && return 0
  command -v nvcc >/dev/null 2>&1 && return 0
  [[ -x /usr/local/cuda/bin/nvcc ]] && return 0
  ls "$dest"/nvidia/*/bin/nvcc >/dev/null 2>&1
}
if ! have_nvcc; then
  need+=("${toolchain[@]}")
fi
if ((${#need[@]})); then
  echo "check_csrc: installing ${need[*]} into $dest"
  "$python" -m pip install --quiet --no-deps --no-compile --target "$dest" "${need[@]}"
fi

cd "$here"
PYTHONPATH="$dest${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m pytest -q tests/test_csrc_compile.py "$@"
