"""setup.py's choice of whether and how to build the CUDA extension, on CPU with stand-in tools.

A fake toolkit (an ``nvcc`` that is never run and empty cuBLAS / cuSOLVER headers
beside it) passes setup.py's checks, and a fake ``cmake`` first on PATH records
the arguments it is given, so no compiler runs. setup.py runs in a fresh
interpreter, as pip runs it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Runs setup.py as __main__ with the arguments after the flag; "--hide-pybind11" makes
# `import pybind11` fail, as in a --no-build-isolation install without it.
RUN_SETUP = """
import runpy, sys
if sys.argv[1] == "--hide-pybind11":
    sys.modules["pybind11"] = None
sys.argv = ["setup.py", *sys.argv[2:]]
runpy.run_path("setup.py", run_name="__main__")
"""

FAKE_CMAKE = """#!{python}
import json, os, sys
with open(os.environ["FAKE_CMAKE_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


@pytest.fixture
def fake_tools(tmp_path):
    """PATH with a recording cmake first, a fake nvcc with the headers setup.py looks for, and the log."""
    bin_dir, include = tmp_path / "bin", tmp_path / "include"
    bin_dir.mkdir()
    include.mkdir()
    for header in ("cublas_v2.h", "cusolverDn.h"):
        (include / header).write_text("")
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 1\n")
    cmake = bin_dir / "cmake"
    cmake.write_text(FAKE_CMAKE.format(python=sys.executable))
    for tool in (nvcc, cmake):
        tool.chmod(0o755)
    log = tmp_path / "cmake.log"
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "CMAKE_GENERATOR", "SPHERE_FAST_BUILD_DIR")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", CUDACXX=str(nvcc), FAKE_CMAKE_LOG=str(log))
    return env, log


def run_setup(env: dict, tmp_path: Path, *, hide_pybind11: bool = False) -> subprocess.CompletedProcess:
    args = ["build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "build")]
    flag = "--hide-pybind11" if hide_pybind11 else "--"
    return subprocess.run([sys.executable, "-c", RUN_SETUP, flag, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def cmake_calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_auto_mode_without_pybind11_installs_without_the_extension(fake_tools, tmp_path):
    env, log = fake_tools
    env["SPHERE_FAST_BUILD_CUDA"] = "auto"
    proc = run_setup(env, tmp_path, hide_pybind11=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pybind11 not found" in proc.stdout and "installing without the CUDA extension" in proc.stdout
    assert cmake_calls(log) == []


def test_forced_build_without_pybind11_fails_and_says_why(fake_tools, tmp_path):
    env, log = fake_tools
    env["SPHERE_FAST_BUILD_CUDA"] = "1"
    proc = run_setup(env, tmp_path, hide_pybind11=True)
    assert proc.returncode != 0
    assert "cannot build the CUDA extension: pybind11 not found" in proc.stdout + proc.stderr
    assert cmake_calls(log) == []


def test_cmake_args_keep_quoted_values_whole(fake_tools, tmp_path):
    pytest.importorskip("pybind11", reason="setup.py needs pybind11 to configure the build")
    env, log = fake_tools
    env["SPHERE_FAST_BUILD_CUDA"] = "1"
    env["CMAKE_ARGS"] = "-DCMAKE_CUDA_FLAGS='-O3 -lineinfo' -DSPHERE_FAST_NOTE=\"a b\"  -DCMAKE_VERBOSE_MAKEFILE=ON"
    proc = run_setup(env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    configure, build = cmake_calls(log)
    assert configure[0] == str(ROOT) and build[:2] == ["--build", "."]
    # Three arguments, in order: a whitespace split would cut the first two apart and keep the quotes.
    expected = ["-DCMAKE_CUDA_FLAGS=-O3 -lineinfo", "-DSPHERE_FAST_NOTE=a b", "-DCMAKE_VERBOSE_MAKEFILE=ON"]
    assert expected[0] in configure, configure
    start = configure.index(expected[0])
    assert configure[start : start + 3] == expected, configure
    assert f"-DCMAKE_CUDA_COMPILER={env['CUDACXX']}" in configure
