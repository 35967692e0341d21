# Set up (once) and activate the project's virtual environment.
# Usage: source scripts/env.sh EXTRAS      e.g. source scripts/env.sh triton,editing,test
# torch: an importable torch is kept; otherwise the machine's local CPU wheel
# (/opt/wheels) for this Python is installed, and only failing that PyPI's.
# SPHERE_FAST_VENV (default .venv) and PYTHON (default python3) may be set.
_sf_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_sf_venv=${SPHERE_FAST_VENV:-$_sf_root/.venv}
_sf_extras=${1:-}

if [ ! -x "$_sf_venv/bin/python" ]; then
  echo "[env] creating virtual environment $_sf_venv"
  "${PYTHON:-python3}" -m venv "$_sf_venv" || return 1
fi
. "$_sf_venv/bin/activate"

if ! python -c "import torch" 2>/dev/null; then
  _sf_tag=$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  _sf_wheel=$(ls /opt/wheels/torch-*-"$_sf_tag"-*linux*_x86_64.whl 2>/dev/null | head -n 1)
  if [ -n "$_sf_wheel" ]; then
    echo "[env] installing torch from $_sf_wheel"
    python -m pip install -q "$_sf_wheel" || return 1
  else
    echo "[env] installing torch from the package index"
    python -m pip install -q torch || return 1
  fi
fi

# Build requirements first, so the editable install needs no isolated build env.
python -m pip install -q setuptools wheel pybind11 cmake numpy || return 1
_sf_spec="$_sf_root"
[ -n "$_sf_extras" ] && _sf_spec="$_sf_root[$_sf_extras]"
python -m pip install -q --no-build-isolation -e "$_sf_spec" || return 1
unset _sf_root _sf_venv _sf_extras _sf_tag _sf_wheel _sf_spec
