"""Build script: the Python package, plus the optional CUDA extension via CMake.

SPHERE_FAST_BUILD_CUDA selects the extension build:
  auto (default)  build when nvcc and the cuBLAS/cuSOLVER headers are found,
                  otherwise install the package without it;
  1               build it, and fail if it cannot be built;
  0               never build it.
CMAKE_ARGS, CMAKE_GENERATOR and CMAKE_BUILD_PARALLEL_LEVEL are honoured (Ninja is
used when it is on PATH and no generator is named); SPHERE_FAST_BUILD_DIR keeps
the CMake build folder between installs. torch is never imported.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def nvidia_wheel_roots() -> list[str]:
    """Folders of the nvidia-* wheels (cuBLAS, cuSOLVER, runtime) in this environment."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    roots = []
    for base in spec.submodule_search_locations:
        for sub in sorted(glob.glob(os.path.join(base, "*"))):
            if os.path.isdir(os.path.join(sub, "include")):
                roots.append(sub)
    return roots


def find_nvcc() -> str | None:
    for env in ("CUDACXX",):
        if os.environ.get(env):
            return os.environ[env]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        found = "/usr/local/cuda/bin/nvcc"
    return found


def find_cmake() -> str:
    """cmake on PATH, else the one the `cmake` Python package (a build requirement) ships."""
    found = shutil.which("cmake")
    if found:
        return found
    try:
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except (ImportError, AttributeError):
        raise OSError("cmake not found: put it on PATH or pip install cmake") from None


def cuda_headers_found(nvcc: str, roots: list[str]) -> bool:
    candidates = [os.path.join(r, "include") for r in roots]
    candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    have = lambda h: any(os.path.exists(os.path.join(c, h)) for c in candidates)
    return have("cublas_v2.h") and have("cusolverDn.h")


def pybind11_cmake_dir() -> str | None:
    """pybind11's CMake package folder; None where pybind11 is missing (an install with --no-build-isolation)."""
    try:
        import pybind11
    except ImportError:
        return None
    return pybind11.get_cmake_dir()


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    def build_extensions(self):
        # Extensions that were skipped are dropped, so the install (editable
        # too) does not look for their output.
        self.extensions = [ext for ext in self.extensions if self.build_extension(ext)]

    def build_extension(self, ext) -> bool:
        mode = os.environ.get("SPHERE_FAST_BUILD_CUDA", "auto").strip().lower()
        if mode not in ("auto", "0", "1"):
            raise SystemExit(f"SPHERE_FAST_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
        if mode == "0":
            print("sphere_fast: SPHERE_FAST_BUILD_CUDA=0, skipping the CUDA extension")
            return False
        nvcc = find_nvcc()
        roots = nvidia_wheel_roots()
        pybind11_dir = pybind11_cmake_dir()
        why = None
        if nvcc is None:
            why = "nvcc not found"
        elif not cuda_headers_found(nvcc, roots):
            why = "cuBLAS/cuSOLVER headers not found"
        elif pybind11_dir is None:
            why = "pybind11 not found (pip install pybind11)"
        if why is not None:
            if mode == "1":
                raise SystemExit(f"sphere_fast: cannot build the CUDA extension: {why}")
            print(f"sphere_fast: {why}; installing without the CUDA extension")
            return False
        try:
            self._cmake(ext, nvcc, roots, pybind11_dir)
        except (subprocess.CalledProcessError, OSError) as exc:
            if mode == "1":
                raise
            print(f"sphere_fast: CUDA extension build failed ({exc}); installing without it")
            return False
        return True

    def _cmake(self, ext, nvcc, roots, pybind11_dir):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # SPHERE_FAST_BUILD_DIR keeps CMake's folder between installs (setuptools
        # gives each editable install a fresh temporary build_temp).
        build_dir = Path(os.environ.get("SPHERE_FAST_BUILD_DIR") or self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11_dir}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DSPHERE_FAST_CUDA_ROOTS={';'.join(roots)}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))  # keeps quoted values with spaces whole
        build_args = ["--config", "Release"]
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ:
            build_args += ["--parallel", str(os.cpu_count() or 2)]
        cmake = find_cmake()
        if not os.environ.get("CMAKE_GENERATOR") and not (build_dir / "CMakeCache.txt").exists():
            ninja = shutil.which("ninja")
            if ninja:
                args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
            elif shutil.which("make") is None:
                raise OSError("neither ninja nor make is on PATH: pip install ninja")
        subprocess.run([cmake, ext.source_dir, *args], cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", *build_args], cwd=build_dir, check=True)


setup(
    name="sphere_fast",
    version="0.1.0",
    description="Fast SPHERE sparse projection for sequential LLM knowledge editing",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["sphere_fast", "sphere_fast.*"]) + ["sphere_fast.kernels"],
    package_dir={"sphere_fast.kernels": "kernels"},
    package_data={"sphere_fast": ["configs/**/*.yaml"]},
    install_requires=["torch", "numpy"],
    extras_require={
        # tested: 3.6.0 (the GPU machine; scripts/test.sh runs the kernel tests with it) and 3.9.0
        "triton": ["triton>=3.6,<3.10"],
        "editing": ["transformers>=5,<6", "accelerate", "safetensors", "tqdm", "tokenizers", "pyyaml", "matplotlib", "gguf<1"],
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "bench": ["pytest", "pytest-benchmark"],
    },
    ext_modules=[CMakeExtension("sphere_fast._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["sphere-fast=sphere_fast.cli:main"]},
    zip_safe=False,
)
