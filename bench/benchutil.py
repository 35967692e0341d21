"""Helpers shared by the benchmarks and the GPU check: device sync, peak memory, the run's environment.

Imported as ``benchutil`` (pytest puts ``bench/`` on sys.path through bench/conftest.py; the
scripts in ``bench/`` find it beside them).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # Last, not first: the root's kernels/ folder would shadow the Hugging Face kernels package,
    # which transformers (5.25 and later) imports where it is installed.
    sys.path.append(str(ROOT))

# Environment variable choosing the benchmarks' shapes: "tiny" (the dry run), "cpu", "gpu".
SHAPES_ENV = "SPHERE_FAST_BENCH_SHAPES"


def shape_set() -> str:
    """The shape set asked for (default: "gpu" with a CUDA device, else "cpu")."""
    choice = os.environ.get(SHAPES_ENV, "").strip().lower() or ("gpu" if torch.cuda.is_available() else "cpu")
    if choice not in ("tiny", "cpu", "gpu"):
        raise ValueError(f"{SHAPES_ENV} must be tiny, cpu or gpu, got {choice!r}")
    return choice


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cuda_extension_skip_reason() -> str | None:
    """Why the CUDA extension's benchmarks cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    from sphere_fast.backends import backend_status

    ok, why = backend_status("cuda", torch.device("cuda"))
    return None if ok else why


def _extension_pool(device: torch.device):
    """The CUDA extension's memory-pool counter, when the extension is loaded (else None)."""
    if device.type != "cuda":
        return None
    from sphere_fast.backends import cuda_extension

    try:
        ext = cuda_extension()
    except ImportError:
        return None
    return lambda reset: ext.mempool_used(device.index if device.index is not None else torch.cuda.current_device(),
                                          reset)


class PeakMemory:
    """Peak device memory a block needs beyond what was allocated before it: torch's allocator
    peak plus the CUDA extension's own pool (``cudaMallocAsync``) peak. ``bytes`` is None on CPU."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.bytes: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._pool = _extension_pool(self.device)
            if self._pool is not None:
                self._pool(True)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            extra = torch.cuda.max_memory_allocated(self.device) - self._base
            if self._pool is not None:
                extra += self._pool(False)[1]
            self.bytes = int(extra)
        return False


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def command_output(cmd: list[str]) -> str | None:
    """The stripped stdout of ``cmd``, or None when it is not installed, fails or runs past 30 s."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> dict:
    """HEAD and whether tracked files differ from it; GPU_CHECK_COMMIT when set (a copy's .git may be stale)."""
    if os.environ.get("GPU_CHECK_COMMIT"):
        return {"id": os.environ["GPU_CHECK_COMMIT"], "dirty": None}
    commit = command_output(["git", "rev-parse", "HEAD"])
    if commit is None:
        return {"id": None, "dirty": None}
    dirty = command_output(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"id": commit, "dirty": bool(dirty) if dirty is not None else None}


def nvcc_version() -> str | None:
    out = command_output([os.environ.get("CUDACXX") or "nvcc", "--version"])
    match = re.search(r"release ([\d.]+)", out or "")
    return match.group(1) if match else None


def environment() -> dict:
    """Device, date, commit and the versions that matter for the results."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "nvcc": nvcc_version(),
        "cuda_available": torch.cuda.is_available(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=torch.cuda.get_device_name(0),
            capability=list(torch.cuda.get_device_capability(0)),
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            driver=command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        )
    return env


def device_slug(env: dict) -> str:
    """A file-name-safe name of the device: "nvidia-h200", or "cpu"."""
    return re.sub(r"[^a-z0-9]+", "-", str(env.get("device", "cpu")).lower()).strip("-") or "cpu"


def study_folder_args(description: str, default_out: str, argv=None, *, only: bool = True):
    """Parse ``--out`` (a study's output folder) and, with ``only``, ``--only RUN ...`` for the scripts
    that read a finished study back; returns (out, spec, only runs). An --only name the spec lacks is
    a usage error naming it."""
    import argparse

    from sphere_fast.harness.report import read_json
    from sphere_fast.harness.study_spec import load_spec

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=default_out, help="the study's output folder")
    if only:
        parser.add_argument("--only", nargs="+", default=(), metavar="RUN", help="only these runs of the spec")
    args = parser.parse_args(argv)
    out = Path(args.out)
    spec = load_spec(read_json(out / "spec.json")["spec"])
    chosen = tuple(getattr(args, "only", ()))
    unknown = set(chosen) - {run.name for run in spec.runs}
    if unknown:
        parser.error(f"--only: no run named {', '.join(sorted(unknown))} in {out / 'spec.json'}")
    return out, spec, chosen
