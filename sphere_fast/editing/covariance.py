"""Key statistics C0 = E[k k^T]: the uncentred mean second moment of an edited module's input.

Keys are the inputs of the rewritten module (e.g. ``down_proj``) at every
token of ``n_samples`` text samples, truncated to ``max_length`` tokens. The
mean (sum of k k^T over tokens / token count) is what the public code uses; a
raw sum would scale the spectrum by the token count (docs/editing.md).

Samples are the non-empty lines of a .txt file, or the ``text`` field of a
.jsonl file, kept *raw* as the public MEMIT/AlphaEdit code reads WikiText
rows: leading spaces, headings (`` = Title = ``) and the line's newline stay;
only lines that hold nothing but whitespace are skipped (and a UTF-8 byte
order mark is not text). WikiText lines start with a space that becomes part
of the first token, so stripping lines would change C0 (docs/editing.md).
``STATS_DEFINITION`` is part of the cache key, so statistics cached under an
earlier definition are recomputed, never reused.

The forward stops at the last module whose input is needed (no later layers,
no LM head), texts are sorted by length and batched under a token budget (so
padding is small), and each batch's fp32 products are summed in float64.

Results are cached on disk as safetensors, keyed by a hash of the model weights,
the tokenizer, the module name, dtype, sample count, sequence length, corpus
content and ``STATS_DEFINITION``; a changed key means a recompute.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .._validation import check_positive_int
from ..files import atomic_path, file_sha256
from . import paths
from .model_utils import (
    get_module,
    model_device,
    module_device,
    pad_token_id,
    right_pad,
    tokenizer_fingerprint,
    trace,
    weights_fingerprint,
)

# Changes whenever what the statistics are computed from changes (it is part of the cache key).
STATS_DEFINITION = "raw-lines"
DEFAULT_BATCH_TOKENS = 8192
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_corpus(path: str | Path, n_samples: int) -> list[str]:
    """Up to ``n_samples`` raw texts: non-blank lines of a .txt file (newline kept) or .jsonl ``text`` fields."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"stats_corpus {str(path)!r} does not exist")
    texts: list[str] = []
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if path.suffix == ".jsonl":
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"stats_corpus {str(path)!r} line {lineno}: expected JSON with a 'text' field"
                                     ) from None
                if not isinstance(text, str):
                    raise ValueError(f"stats_corpus {str(path)!r} line {lineno}: 'text' must be a string")
            else:
                text = line
            if text.strip():
                texts.append(text)
                if len(texts) == n_samples:
                    break
    if not texts:
        raise ValueError(f"stats_corpus {str(path)!r} holds no text")
    return texts


def cache_key(weights_fp: str, tok_fp: str, module_name: str, dtype: str, n_samples: int, max_length: int,
              corpus: Path) -> str:
    parts = [weights_fp, tok_fp, module_name, dtype, str(n_samples), str(max_length), file_sha256(corpus)[:16],
             STATS_DEFINITION]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def default_max_length(model) -> int:
    """Tokens per corpus text: the model's context, at most 2048."""
    return int(min(getattr(model.config, "max_position_embeddings", None)
                   or getattr(model.config, "n_positions", 2048), 2048))


def stats_keys(model, tok, module_names: Sequence[str], *, corpus: str | Path, n_samples: int, dtype: str,
               max_length: int | None = None, weights_fp: str | None = None) -> dict[str, str]:
    """The cache key of each module's C0: what :func:`layer_second_moments` would compute it from."""
    weights_fp = weights_fp or weights_fingerprint(model)
    tok_fp = tokenizer_fingerprint(tok)
    max_length = max_length or default_max_length(model)
    return {name: cache_key(weights_fp, tok_fp, name, dtype, n_samples, max_length, Path(corpus))
            for name in module_names}


def _cache_file(cache_dir: Path, module_name: str, key: str) -> Path:
    return Path(cache_dir) / "stats" / f"{module_name.replace('.', '_')}-{key}.safetensors"


def _save_atomic(path: Path, tensor: torch.Tensor, meta: dict) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"mom2": tensor.detach().cpu().contiguous()}, str(tmp), metadata={k: str(v) for k, v in meta.items()})


def _load(path: Path, key: str) -> torch.Tensor | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") != key:
                return None
            return fh.get_tensor("mom2")
    except Exception:  # a corrupt or partial file is recomputed, never trusted
        return None


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by length (longest first), each group's ``rows x longest`` at most ``batch_tokens``.

    A text longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        # Sorted longest first, so a batch's first text sets its padded width.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def compute_second_moments(model, tok, module_names: Sequence[str], texts: Sequence[str], *, max_length: int,
                           batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True) -> dict[str, torch.Tensor]:
    """E[k k^T] (float64, on each module's device) of the inputs of every named module, in one pass.

    The forward ends at the last named module; texts run in length-sorted
    batches of at most ``batch_tokens`` padded tokens.
    """
    check_positive_int(batch_tokens, "batch_tokens")
    encoded = tok(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    encoded = [ids for ids in encoded if ids]
    sums: dict[str, torch.Tensor] = {}
    counts = {name: 0 for name in module_names}
    device = model_device(model)
    pad_id = pad_token_id(tok)
    batches = length_batches([len(ids) for ids in encoded], batch_tokens)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="key statistics", unit="batch", leave=False)
    for batch in batches:
        ids, mask = right_pad([encoded[i] for i in batch], pad_id, device)
        with trace(model, module_names, inputs=True, outputs=False, stop=True) as rec:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        for name in module_names:
            keys = rec[name]["input"]
            k = keys[mask.to(keys.device).bool()].float()
            product = (k.T @ k).double()
            if name in sums:
                sums[name] += product
            else:
                sums[name] = product
            counts[name] += k.shape[0]
    if not sums:
        raise ValueError("the texts for the key statistics tokenise to nothing")
    return {name: sums[name] / counts[name] for name in module_names}


def layer_second_moments(model, tok, module_names: Sequence[str], *, corpus: str | Path, n_samples: int,
                         dtype: str = "float32", cache_dir: str | Path | None = None, max_length: int | None = None,
                         batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True, weights_fp: str | None = None,
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
    max_length = max_length or default_max_length(model)
    keys = stats_keys(model, tok, module_names, corpus=corpus, n_samples=n_samples, dtype=dtype,
                      max_length=max_length, weights_fp=weights_fp)
    result: dict[str, torch.Tensor] = {}
    for name in module_names:
        cached = _load(_cache_file(cache_dir, name, keys[name]), keys[name])
        if cached is not None:
            result[name] = cached.to(module_device(get_module(model, name)))
    missing = [name for name in module_names if name not in result]
    if missing:
        texts = read_corpus(corpus, n_samples)
        if len(texts) < n_samples:
            warnings.warn(f"stats_corpus {str(corpus)!r} holds {len(texts)} texts, fewer than mom2_n_samples="
                          f"{n_samples}: C0 is their mean", stacklevel=2)
        fresh = compute_second_moments(model, tok, missing, texts, max_length=max_length, batch_tokens=batch_tokens,
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
