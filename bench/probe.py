"""The GPU check's first step: what machine this is, and which backends can run on it.

    python bench/probe.py --out probe.json

Prints a short summary and writes the environment (device, date, commit, torch /
triton / CUDA / transformers versions; benchutil.environment) and each backend's
status to JSON.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import command_output, environment  # noqa: E402

from sphere_fast import available_backends  # noqa: E402


def build_prerequisites() -> dict:
    """What the CUDA extension's build needs, and where (or whether) it was found."""
    include = sysconfig.get_paths().get("include") or ""
    nvcc = shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
    return {
        "nvcc": nvcc,
        "cmake": shutil.which("cmake"),
        "ninja": shutil.which("ninja"),
        "make": shutil.which("make"),
        "python_h": os.path.join(include, "Python.h") if os.path.exists(os.path.join(include, "Python.h")) else None,
        "pybind11": importlib.util.find_spec("pybind11") is not None,
        "nvidia_wheels": importlib.util.find_spec("nvidia") is not None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    env = environment()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env["backends"] = {device: available_backends(device)}
    env["nvidia_smi"] = command_output(["nvidia-smi"])
    env["build_prerequisites"] = build_prerequisites()
    for key in ("device", "date", "commit", "python", "torch", "torch_cuda", "triton", "transformers", "nvcc",
                "driver", "capability", "multiprocessors", "memory_gib"):
        if key in env:
            print(f"{key:16s} {env[key]}")
    for name, found in env["build_prerequisites"].items():
        print(f"build needs {name:14s} {found if found else 'MISSING'}")
    for name, status in env["backends"][device].items():
        print(f"backend {name:8s} {status}")
    args.out.write_text(json.dumps(env, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
