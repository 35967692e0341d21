"""Build, link and import the CUDA extension for sm_90a: the CI check without a GPU.

setup.py's CMake build of ``sphere_fast._C`` (configure, compile every source,
link against cuBLAS / cuSOLVER / the CUDA runtime) runs for sm_90a only, and a
fresh interpreter imports the result, which must not touch the GPU. Headers are
also compiled as translation units of their own.

Needs nvcc (skipped, with the reason, only when it is missing) and the cuBLAS /
cuSOLVER headers, which come from the nvidia-* wheels and are found through the
``nvidia`` namespace package, as setup.py finds them. On a machine without a
CUDA build of torch, install the headers with

    pip install --no-deps nvidia-cublas==13.0.2.14 nvidia-cusolver==12.0.4.66

(CUDA 13 wheels, ``nvidia/cu13/include``; the CUDA 12 ``-cu12`` wheels,
``nvidia/{cublas,cusolver}/include``, work too). The import needs the
libraries libcusolver.so loads (``nvidia-cusparse==12.6.3.3 nvidia-nvjitlink==13.0.88``).
A machine without a CUDA toolkit can take nvcc from wheels as well (found in
``nvidia/*/bin``):

    pip install --no-deps nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85

scripts/cuda_wheels.sh installs all of these once, outside the repo.
"""
from __future__ import annotations

import ast
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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
@pytest.mark.parametrize("path", [p for p in csrc_files() if p.suffix in HEADER_SUFFIXES], ids=lambda p: p.name)
def test_header_compiles_on_its_own_for_sm90a(path: Path, include_flags, tmp_path):
    """Each header as a CUDA translation unit of its own: it includes what it uses."""
    cmd = [NVCC, "-c", f"-arch={ARCH}", "-std=c++17", "--expt-relaxed-constexpr", "-O2", *include_flags]
    cmd += ["-x", "cu", str(path), "-o", str(tmp_path / (path.name + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed on csrc/{path.name}:\n{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"


LAUNCH_2D_SHAPES = [(1, 1), (1, 31), (3, 32), (5, 33), (7, 255), (4096, 256), (4096, 14336), (100000, 7),
                    (14336, 778), (1, 1 << 40), (1 << 40, 64), (1 << 40, 1 << 40)]
LAUNCH_2D_MAIN = """
#include <cstdio>
#include "common.cuh"
int main() {
  long long rows, cols;
  while (std::scanf("%lld %lld", &rows, &cols) == 2) {
    const auto l = sphere_fast::detail::launch_2d(rows, cols);
    std::printf("%u %u %u %u %u %u\\n", l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y, l.block.z);
  }
}
"""


@needs_nvcc
def test_launch_2d_gives_every_block_work_within_the_grid_limits(include_flags, tmp_path):
    """detail::launch_2d (the project kernels' elementwise launches), run on the host: 256 threads with a warp or
    more along the columns, no block without an element, and grids capped where the grid-stride loops take over."""
    (tmp_path / "main.cu").write_text(LAUNCH_2D_MAIN)
    cmd = [NVCC, f"-arch={ARCH}", "-std=c++17", *include_flags, str(tmp_path / "main.cu"), "-o", str(tmp_path / "main")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    stdin = "".join(f"{rows} {cols}\n" for rows, cols in LAUNCH_2D_SHAPES)
    proc = subprocess.run([str(tmp_path / "main")], input=stdin, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(LAUNCH_2D_SHAPES)
    for (rows, cols), line in zip(LAUNCH_2D_SHAPES, lines):
        gx, gy, gz, bx, by, bz = map(int, line.split())
        shape = (rows, cols, line)
        assert (gz, bz, bx * by) == (1, 1, 256), shape
        # x: the smallest power of two from a warp up to 256 threads that spans the columns
        assert bx in (32, 64, 128, 256) and (bx == 32 or bx // 2 < cols), shape
        assert 1 <= gx <= 4096 and 1 <= gy <= 65535, shape
        assert (gx - 1) * bx < cols and (gy - 1) * by < rows, shape  # every block has an element
        assert gx * bx >= cols or gx == 4096, shape  # one pass unless capped
        assert gy * by >= rows or gy == 65535, shape


# Run in a fresh interpreter: import the built module by its path, then list what
# the process has mapped. The CUDA driver (libcuda.so.1) is loaded by the runtime
# on its first device call, so it must not be there after an import; libtorch
# must never be there (the extension does not link it).
IMPORT_CHECK = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("sphere_fast._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mapped = {line.split()[-1].rsplit("/", 1)[-1] for line in open("/proc/self/maps") if "/" in line}
print("driver" if any(name.startswith("libcuda.so") for name in mapped) else "no-driver")
print("libtorch" if any(name.startswith("libtorch") for name in mapped) else "no-libtorch")
print(sorted(name for name in dir(mod) if not name.startswith("__")))
print(mod.runtime_version())
"""


# The solver's host rules from the built module against sphere_fast.eigensolver's, on random spectra
# (power laws with tails below the full-energy slack, zeros, leading parts of a spectrum) and residual
# histories; prints the number of cases compared.
RULES_CHECK = """
import importlib.util, math, random, sys
import torch
from sphere_fast import eigensolver as twin
spec = importlib.util.spec_from_file_location("sphere_fast._C", sys.argv[1])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
rng = random.Random(0)
cases = 0
for _ in range(3000):
    n = rng.randint(1, 60)
    vals = sorted((rng.random() * (i + 1) ** -rng.uniform(0.0, 3.0) for i in range(n)), reverse=True)
    if rng.random() < 0.3:  # rank deficient
        cut = rng.randint(1, n)
        vals = vals[:cut] + [0.0] * (n - cut)
    if rng.random() < 0.3:
        vals = sorted(vals + [v * 1e-9 for v in vals[:3]], reverse=True)  # a tail inside the slack
    total = sum(vals)
    trace = total if rng.random() < 0.5 else total * rng.uniform(1.0, 3.0)
    if trace <= 0.0:
        continue
    eta, complete = rng.choice([1.0, rng.random() or 0.5]), rng.random() < 0.5
    expected = twin.select_rank(torch.tensor(vals, dtype=torch.float64), trace, eta, complete=complete)
    got = ext.select_rank(vals, trace, eta, complete, twin.FULL_ENERGY_SLACK)
    assert got == (expected or 0), (vals, trace, eta, complete, got, expected)
    k = len(vals)
    r = rng.randint(1, k)
    worst, tol = 10 ** rng.uniform(-9, 0), 10 ** rng.uniform(-8, -4)
    previous = rng.choice([None, worst * rng.uniform(0.5, 3.0)])
    expected = twin.iterations_to_converge(vals, worst, previous, r, k, tol)
    got = ext.iterations_to_converge(vals, worst, -1.0 if previous is None else previous, r, k, tol)
    assert got == expected or math.isclose(got, expected, rel_tol=1e-12), (vals, worst, previous, r, k, tol, got, expected)
    cases += 1
print(cases)
"""


@needs_nvcc
def test_extension_builds_links_and_imports_for_sm90a(include_flags, tmp_path):
    """setup.py's CMake build of sphere_fast._C (SPHERE_FAST_BUILD_CUDA=1), sm_90a only, then an import."""
    env = dict(os.environ, SPHERE_FAST_BUILD_CUDA="1", CMAKE_ARGS=f"-DCMAKE_CUDA_ARCHITECTURES={ARCH[3:]}-real")
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
           "--build-temp", str(tmp_path / "build")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"the CMake build of sphere_fast._C failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    built = sorted((tmp_path / "lib" / "sphere_fast").glob("_C*.so"))
    assert len(built) == 1, f"expected one sphere_fast/_C*.so, got {built}\n{proc.stdout[-3000:]}"

    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK, str(built[0])], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"importing the built sphere_fast._C failed:\n{proc.stderr}"
    driver, torch_lib, names, runtime = proc.stdout.strip().splitlines()
    assert driver == "no-driver", "importing sphere_fast._C loaded the CUDA driver"
    assert torch_lib == "no-libtorch"
    for name in ("eigensolve", "project", "EigResult", "runtime_version", "mempool_used", "memory_pools_supported",
                 "select_rank", "iterations_to_converge"):
        assert repr(name) in names, (name, names)
    assert int(runtime) >= 12000  # the CUDA runtime it linked answers without a GPU

    # The rank rule and the convergence estimate the solver runs are the torch twin's (no device needed).
    proc = subprocess.run([sys.executable, "-c", RULES_CHECK, str(built[0])], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"the extension's host rules differ from sphere_fast.eigensolver's:\n{proc.stderr}"
    assert int(proc.stdout.strip()) > 2500

    # Every extension call of sphere_fast._cuda passes exactly the keywords the binding declares.
    proc = subprocess.run([sys.executable, "-c", SIGNATURE_CHECK, str(built[0])], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    declared = json.loads(proc.stdout)
    calls = extension_calls(ROOT / "sphere_fast" / "_cuda.py")
    assert {"eigensolve", "project"} <= set(calls), calls
    for name, keywords in calls.items():
        assert keywords == declared[name], (name, sorted(set(keywords) ^ set(declared[name])))

    # project's argument rules on made-up addresses: every case stops at a ValueError before any device work
    # (alpha is NaN and checked last, so a layout the rules accept ends there).
    cases = json.dumps({name: over for name, (over, _) in PROJECT_ARGS.items()})
    proc = subprocess.run([sys.executable, "-c", PROJECT_ARGS_CHECK, str(built[0]), cases], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    for name, (_, expected) in PROJECT_ARGS.items():
        assert got[name].startswith(expected), (name, expected, got[name])


OUT = 1 << 40  # PROJECT_ARGS_CHECK's out: made-up device addresses, never dereferenced
# name: (overrides of project's arguments, the start of its ValueError). The base is a contiguous fp32 4 x 6 out
# and B at disjoint addresses, r = 0, no W.
ACCEPTED = "project: alpha must be finite"
PROJECT_ARGS = {
    "base": ({}, ACCEPTED),
    "out row stride 0": ({"os0": 0}, "project: out's strides must be >= 1"),
    "out column stride -1": ({"os1": -1}, "project: out's strides must be >= 1"),
    "one row, any row stride": ({"n": 1, "os0": 0}, ACCEPTED),
    "out strides past int64": ({"os0": 1 << 61}, "project: out's strides (2305843009213693952, 1) overflow"),
    "out strides (1, 1)": ({"os0": 1, "os1": 1}, "project: out's strides (1, 1) map different elements"),
    "2 x 3 out, strides (2, 1)": ({"n": 2, "d": 3, "ldb": 3, "os0": 2}, "project: out's strides (2, 1) map"),
    "2 x 2 out, strides (3, 2)": ({"n": 2, "d": 2, "ldb": 2, "os0": 3, "os1": 2}, ACCEPTED),
    "W row stride 0": ({"W": 1 << 42, "ws0": 0}, "project: W's strides must be >= 1"),
    "W is out": ({"W": OUT, "ws0": 6}, ACCEPTED),
    "W one element past out": ({"W": OUT + 4, "ws0": 6}, "project: W must be out itself"),
    "W is out transposed": ({"W": OUT, "ws0": 1, "ws1": 4}, "project: W must be out itself"),
    "W elsewhere": ({"W": 1 << 42, "ws0": 6}, ACCEPTED),
    "B is out": ({"B": OUT}, ACCEPTED),
    "B is out as float16": ({"B": OUT, "b_dtype": 2}, "project: B must be out itself"),
    "B is out with row stride 7": ({"B": OUT, "ldb": 7}, "project: B must be out itself"),
    "B ends where out starts": ({"B": OUT - 96}, ACCEPTED),
    "B overlaps out's first element": ({"B": OUT - 92}, "project: B must be out itself"),
    "more than 65535 x 128 rows": ({"n": 65535 * 128 + 1, "d": 1, "ldb": 1, "os0": 1}, ACCEPTED),
    "2^45 tiles": ({"n": 1 << 29, "d": 1 << 30, "ldb": 1 << 30, "os0": 1 << 30, "B": 1 << 62},
                   "project: B of 536870912 x 1073741824 needs more than 2^31 - 1 tiles"),
}
# Calls project once per case (argv[2]: JSON of name -> overrides) and prints name -> its ValueError.
PROJECT_ARGS_CHECK = """
import importlib.util, json, math, sys
spec = importlib.util.spec_from_file_location("sphere_fast._C", sys.argv[1])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
base = dict(out=1 << 40, out_dtype=0, os0=6, os1=1, W=0, ws0=0, ws1=1, B=1 << 41, b_dtype=0, ldb=6, U=0, ldu=0,
            n=4, d=6, r=0, alpha=math.nan, T=0, u_hi=0, u_lo=0, ldh=0, t3=0, u3=0, ld3=0, C=0, c_rows=0, stream=0)
out = {}
for name, over in json.loads(sys.argv[2]).items():
    try:
        ext.project(**dict(base, **over))
        out[name] = "no error"
    except ValueError as exc:
        out[name] = str(exc)
print(json.dumps(out))
"""


# The keyword names each function of the built module declares (pybind11's signature line).
SIGNATURE_CHECK = """
import importlib.util, json, re, sys
spec = importlib.util.spec_from_file_location("sphere_fast._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
out = {}
for name in ("eigensolve", "project"):
    head = getattr(mod, name).__doc__.splitlines()[0]
    out[name] = re.findall(r"(\\w+): ", head[head.index("(") + 1:head.rindex(")")])
print(json.dumps(out))
"""


def extension_calls(path: Path) -> dict[str, list[str]]:
    """Keyword names of each ``ext.<name>(...)`` call in a module, in order (one call per name)."""
    calls = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "ext"):
            assert node.func.attr not in calls, f"two calls of ext.{node.func.attr} in {path}"
            calls[node.func.attr] = [k.arg for k in node.keywords]
    return calls
