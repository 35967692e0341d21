"""Started from the checkout root, sphere_fast keeps its kernels/ folder from hiding Hugging Face's kernels."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
import sphere_fast
import transformers
from transformers import AutoModelForCausalLM  # imports transformers.integrations.hub_kernels
print(sys.modules["kernels"].__file__)
"""


def test_checkout_root_on_sys_path_does_not_shadow_hub_kernels():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the Hugging Face kernels package is not installed here (transformers < 5.25)")
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = Path(proc.stdout.strip().splitlines()[-1]).resolve()
    assert ROOT / "kernels" not in found.parents, found
