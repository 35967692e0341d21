"""Compile every file in csrc/ with nvcc for sm_90a: the CI check without a GPU.

Needs nvcc (skipped, with the reason, only when it is missing) and the cuBLAS /
cuSOLVER headers, which come from the nvidia-* wheels and are found through the
``nvidia`` namespace package, as setup.py finds them. On a machine without a
CUDA build of torch, install the headers with

    pip install --no-deps nvidia-cublas==13.0.2.14 nvidia-cusolver==12.0.4.66

(CUDA 13 wheels, ``nvidia/cu13/include``; the CUDA 12 ``-cu12`` wheels,
``nvidia/{cublas,cusolver}/include``, work too). A machine without a CUDA
toolkit can take nvcc from wheels as well (found in ``nvidia/*/bin``):

    pip install --no-deps nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 Sources (.cu, .cpp) are
compiled as they are; headers (.h, .cuh) as CUDA translation units of their
own, which also checks that each includes what it uses.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCH = "sm_90a"
SOURCE_SUFFIXES = (".cu", ".cpp")
HEADER_SUFFIXES = (".h", ".cuh")
HEADERS_HINT = (
    "pip install --no-deps nvidia-cublas==13.0.2.14 nvidia-cusolver==12.0.4.66 "
    "(or the CUDA 12 wheels nvidia-cublas-cu12 / nvidia-cusolver-cu12)"
)


def find_nvcc() -> str | None:
    """nvcc as setup.py looks for it (CUDACXX, CUDA_HOME / CUDA_PATH, PATH), then
    /usr/local/cuda and the nvidia-cuda-nvcc wheel (nvidia/*/bin/nvcc)."""
    if os.environ.get("CUDACXX") and os.path.exists(os.environ["CUDACXX"]):
        return os.environ["CUDACXX"]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    if os.path.exists(default):
        return default
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        for candidate in sorted(glob.glob(os.path.join(base, "*", "bin", "nvcc"))):
            if os.access(candidate, os.X_OK):
                return candidate
    return None


def wheel_include_dirs() -> list[str]:
    """include/ folders of the installed nvidia-* wheels (both wheel layouts)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        for sub in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if os.path.isdir(sub):
                dirs.append(sub)
    return dirs


def toolkit_include_dirs(nvcc: str) -> list[str]:
    home = Path(os.path.realpath(nvcc)).parent.parent
    return [str(p) for p in (home / "include", home / "targets" / "x86_64-linux" / "include") if p.is_dir()]


def csrc_files() -> list[Path]:
    return sorted(p for p in CSRC.iterdir() if p.suffix in SOURCE_SUFFIXES + HEADER_SUFFIXES)


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (set CUDACXX or CUDA_HOME, or put nvcc on PATH) to compile csrc/"
)


@pytest.fixture(scope="module")
def include_flags() -> list[str]:
    dirs = wheel_include_dirs() + toolkit_include_dirs(NVCC)
    for header in ("cublas_v2.h", "cusolverDn.h"):
        if not any(os.path.exists(os.path.join(d, header)) for d in dirs):
            pytest.fail(
                f"{header} not found in the nvidia-* wheels ({wheel_include_dirs() or 'none installed'}) "
                f"or beside nvcc; install the headers: {HEADERS_HINT}"
            )
    try:
        import pybind11
    except ImportError:
        pytest.fail("pybind11 is not installed; pip install pybind11 (a build requirement of sphere_fast)")
    dirs += [pybind11.get_include(), sysconfig.get_paths()["include"], str(CSRC)]
    return [f"-I{d}" for d in dirs]


def test_csrc_has_the_extension_sources():
    names = {p.name for p in csrc_files()}
    assert {"sphere_fast.h", "bindings.cpp", "eigensolver.cu", "project.cu"} <= names, names


@needs_nvcc
@pytest.mark.parametrize("path", csrc_files(), ids=lambda p: p.name)
def test_compiles_for_sm90a(path: Path, include_flags, tmp_path):
    cmd = [NVCC, "-c", f"-arch={ARCH}", "-std=c++17", "--expt-relaxed-constexpr", "-O2", *include_flags]
    if path.suffix in HEADER_SUFFIXES:
        cmd += ["-x", "cu"]
    cmd += [str(path), "-o", str(tmp_path / (path.name + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed on csrc/{path.name}:\n{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
