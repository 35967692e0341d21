"""Where data and caches live. Both are settings with defaults, never inside the repo.

Shared by the editing algorithm (the default key-statistics corpus, the C0
cache) and the harness (datasets, models, trained models).

SPHERE_FAST_DATA_DIR   datasets and corpora (default: the ``shared/data`` folder
                       beside the repository checkout, ``<repo>/../shared/data``)
SPHERE_FAST_CACHE_DIR  covariance statistics, trained models (default:
                       ``$XDG_CACHE_HOME/sphere_fast`` or ``~/.cache/sphere_fast``)
"""
from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    env = os.environ.get("SPHERE_FAST_DATA_DIR")
    return Path(env).expanduser() if env else (_REPO_ROOT.parent / "shared" / "data").resolve()


def cache_dir() -> Path:
    env = os.environ.get("SPHERE_FAST_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sphere_fast"


def wikitext_path(split: str = "test") -> Path:
    """The WikiText-2 text file used for key statistics and language-model training."""
    return data_dir() / "wikitext" / f"wikitext2_{split}.txt"


def counterfact_path() -> Path:
    return data_dir() / "counterfact" / "easyedit_counterfact-edit.json"
