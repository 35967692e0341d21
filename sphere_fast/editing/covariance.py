"""Key statistics C0 = E[k k^T]: the uncentred mean second moment of an edited module's input.

Keys are the inputs of the rewritten module (e.g. ``down_proj``) at every
non-pad token of ``n_samples`` text samples (lines of a .txt file, or the
``text`` field of a .jsonl file), truncated to ``max_length`` tokens. The mean
(sum of k k^T over tokens / token count) is what the public code uses; a raw
sum would scale the spectrum by the token count (EDITING-NOTES.md).

Results are cached on disk as safetensors, keyed by a hash of the model weights,
the tokenizer, the module name, dtype, sample count, sequence length and
corpus content; a changed key means a recompute.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from . import paths
from .paths import file_sha256
from .model_utils import get_module, module_device, tokenizer_fingerprint, trace, weights_fingerprint

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_corpus(path: str | Path, n_samples: int) -> list[str]:
    """Up to ``n_samples`` non-empty texts from a .txt (one per line) or .jsonl (``text`` field) file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"stats_corpus {str(path)!r} does not exist")
    texts: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if path.suffix == ".jsonl":
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"stats_corpus {str(path)!r} line {lineno}: expected JSON with a 'text' field") from None
            else:
                text = line
            text = text.strip()
            # WikiText headings (" = Title = ") carry no sentence context.
            if text and not (text.startswith("=") and text.endswith("=")):
                texts.append(text)
                if len(texts) == n_samples:
                    break
    if not texts:
        raise ValueError(f"stats_corpus {str(path)!r} holds no text")
    return texts




def cache_key(weights_fp: str, tok_fp: str, module_name: str, dtype: str, n_samples: int, max_length: int,
              corpus: Path) -> str:
    parts = [weights_fp, tok_fp, module_name, dtype, str(n_samples), str(max_length), file_sha256(corpus)[:16]]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _cache_file(cache_dir: Path, module_name: str, key: str) -> Path:
    return Path(cache_dir) / "stats" / f"{module_name.replace('.', '_')}-{key}.safetensors"


def _save_atomic(path: Path, tensor: torch.Tensor, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({"mom2": tensor.detach().cpu().contiguous()}, tmp, metadata={k: str(v) for k, v in meta.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load(path: Path, key: str) -> torch.Tensor | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") != key:
                return None
            return fh.get_tensor("mom2")
    except Exception:  # a corrupt or partial file is recomputed, never trusted
        return None


@torch.no_grad()
def compute_second_moments(model, tok, module_names: Sequence[str], texts: Sequence[str], *, max_length: int,
                           batch_size: int = 8, progress: bool = True) -> dict[str, torch.Tensor]:
    """E[k k^T] (float64, on each module's device) of the inputs of every named module, in one pass."""
    sums: dict[str, torch.Tensor] = {}
    counts = {name: 0 for name in module_names}
    device = next(model.parameters()).device
    old_side = tok.padding_side
    tok.padding_side = "right"
    try:
        bar = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(bar, desc="key statistics", unit="batch", leave=False)
        for start in bar:
            enc = tok(list(texts[start:start + batch_size]), return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length)
            enc = {k: v.to(device) for k, v in enc.items()}
            with trace(model, module_names, inputs=True, outputs=False) as rec:
                model(**enc)
            for name in module_names:
                keys = rec[name]["input"]
                mask = enc["attention_mask"].to(keys.device).bool()
                k = keys[mask].double()
                s = k.T @ k
                sums[name] = s if name not in sums else sums[name] + s
                counts[name] += k.shape[0]
    finally:
        tok.padding_side = old_side
    return {name: sums[name] / counts[name] for name in module_names}


def layer_second_moments(model, tok, module_names: Sequence[str], *, corpus: str | Path, n_samples: int,
                         dtype: str = "float32", cache_dir: str | Path | None = None, max_length: int | None = None,
                         batch_size: int = 8, progress: bool = True, weights_fp: str | None = None,
                         ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """C0 for every named module, from the disk cache where the key matches, else computed.

    Returns ``({name: C0 on the module's device in ``dtype``}, {name: cache key})``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"mom2_dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    corpus = Path(corpus)
    if not corpus.exists():
        raise FileNotFoundError(f"stats_corpus {str(corpus)!r} does not exist")
    cache_dir = Path(cache_dir) if cache_dir is not None else paths.cache_dir()
    if max_length is None:
        max_length = int(min(getattr(model.config, "max_position_embeddings", None)
                             or getattr(model.config, "n_positions", 2048), 2048))
    weights_fp = weights_fp or weights_fingerprint(model)
    tok_fp = tokenizer_fingerprint(tok)
    keys = {name: cache_key(weights_fp, tok_fp, name, dtype, n_samples, max_length, corpus) for name in module_names}
    result: dict[str, torch.Tensor] = {}
    for name in module_names:
        cached = _load(_cache_file(cache_dir, name, keys[name]), keys[name])
        if cached is not None:
            result[name] = cached.to(module_device(get_module(model, name)))
    missing = [name for name in module_names if name not in result]
    if missing:
        texts = read_corpus(corpus, n_samples)
        fresh = compute_second_moments(model, tok, missing, texts, max_length=max_length, batch_size=batch_size,
                                       progress=progress)
        for name in missing:
            c0 = fresh[name].to(DTYPES[dtype])
            _save_atomic(_cache_file(cache_dir, name, keys[name]), c0,
                         {"key": keys[name], "module": name, "n_samples": len(texts), "corpus": str(corpus)})
            result[name] = c0
    return result, keys


def load_cached(model, module_name: str, key: str, cache_dir: str | Path | None = None) -> torch.Tensor | None:
    """C0 from the cache by its key (used on resume, when the unedited weights are gone)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else paths.cache_dir()
    t = _load(_cache_file(cache_dir, module_name, key), key)
    return None if t is None else t.to(module_device(get_module(model, module_name)))
