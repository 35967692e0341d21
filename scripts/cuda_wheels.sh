#!/usr/bin/env bash
# Make the CUDA headers and libraries that the csrc/ compile, link and import
# check needs available on a machine without a CUDA build of torch (and, where
# no nvcc is found, the nvcc toolchain), and print the folder to put on
# PYTHONPATH (its `nvidia` namespace package is where tests/csrc/test_csrc_compile.py
# and setup.py look).
#
# The wheels go to $SPHERE_FAST_CUDA_WHEELS (default ~/.cache/sphere_fast/cuda-wheels),
# outside the repo and the virtual environment, so the package install itself
# never sees them. Downloads once: ~622 MB of cuBLAS / cuSOLVER (nvidia-cublas
# 421 MB, nvidia-cusolver 201 MB), the libraries libcusolver.so loads
# (nvidia-cusparse, nvidia-nvjitlink), the CUDA runtime where none is beside
# nvcc, ~104 MB more for nvcc itself where there is none.
set -euo pipefail

dest="${SPHERE_FAST_CUDA_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/sphere_fast/cuda-wheels}"
python="${PYTHON:-python3}"

# CUDA 13.0 update 2, the release of the machine's nvcc 13.0.88.
headers=(nvidia-cublas==13.0.2.14 nvidia-cusolver==12.0.4.66)
solver_deps=(nvidia-cusparse==12.6.3.3 nvidia-nvjitlink==13.0.88)
runtime=(nvidia-cuda-runtime==13.0.96)
toolchain=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
           nvidia-cuda-cccl==13.0.85 "${runtime[@]}")

in_wheels() { ls "$dest"/nvidia/*/"$1" >/dev/null 2>&1; }
nvcc_path() {
  if [[ -n "${CUDACXX:-}" && -x "${CUDACXX}" ]]; then echo "$CUDACXX"
  elif [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then echo "$CUDA_HOME/bin/nvcc"
  elif command -v nvcc >/dev/null 2>&1; then command -v nvcc
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then echo /usr/local/cuda/bin/nvcc
  fi
}
# The toolkit's libcudart beside nvcc (/usr/local/bin/nvcc may be a wrapper
# script: the toolkit is then the usual /usr/local/cuda).
toolkit_has_cudart() {
  local nvcc home
  nvcc="$(nvcc_path)"
  [[ -n "$nvcc" ]] || return 1
  for home in "$(dirname "$(dirname "$(readlink -f "$nvcc")")")" /usr/local/cuda; do
    ls "$home"/lib/libcudart.so* "$home"/lib64/libcudart.so* "$home"/targets/*/lib/libcudart.so* >/dev/null 2>&1 && return 0
  done
  return 1
}

need=()
if ! in_wheels include/cublas_v2.h || ! in_wheels include/cusolverDn.h; then
  need+=("${headers[@]}")
fi
if ! in_wheels lib/libcusparse.so.12 || ! in_wheels lib/libnvJitLink.so.13; then
  need+=("${solver_deps[@]}")
fi
if [[ -z "$(nvcc_path)" ]] && ! in_wheels bin/nvcc; then
  need+=("${toolchain[@]}")
elif ! toolkit_has_cudart && ! in_wheels lib/libcudart.so.13; then
  need+=("${runtime[@]}")
fi
if ((${#need[@]})); then
  echo "cuda_wheels: installing ${need[*]} into $dest" >&2
  # pip --target will not merge into an existing nvidia/ folder (and --upgrade
  # would replace it whole): install beside it, then merge.
  mkdir -p "$dest"
  staging="$(mktemp -d "$dest/.staging.XXXXXX")"
  trap 'rm -rf "$staging"' EXIT
  "$python" -m pip install --quiet --no-deps --no-compile --target "$staging" "${need[@]}" >&2
  cp -a "$staging"/. "$dest"/
fi
echo "$dest"
