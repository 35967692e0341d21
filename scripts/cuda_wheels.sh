#!/usr/bin/env bash
# Make the CUDA headers (and, where no nvcc is found, the nvcc toolchain) that
# the csrc/ compile check needs available on a machine without a CUDA build of
# torch, and print the folder to put on PYTHONPATH (its `nvidia` namespace
# package is where tests/test_csrc_compile.py and setup.py look).
#
# The wheels go to $SPHERE_FAST_CUDA_WHEELS (default ~/.cache/sphere_fast/cuda-wheels),
# outside the repo and the virtual environment, so the package install itself
# never sees them. Downloads once: ~622 MB of headers (nvidia-cublas 421 MB,
# nvidia-cusolver 201 MB), ~104 MB more for nvcc.
set -euo pipefail

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
  echo "cuda_wheels: installing ${need[*]} into $dest" >&2
  "$python" -m pip install --quiet --no-deps --no-compile --target "$dest" "${need[@]}" >&2
fi
echo "$dest"
