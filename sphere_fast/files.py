"""Files that are whole or absent: atomic writes of files and folders, and verified cache entries.

A file is written under a temporary name in its own folder and renamed over its target, so a reader
sees the old content or the new, never part of either. A folder is built the same way, beside its
target. An existing target is first renamed aside (``.<name>.old``), then the new folder is renamed in,
then the old one is deleted: at every moment one complete folder is under the target's name or its
aside name, and :func:`current_folder` finds it.

A verified entry is a folder whose marker file, written last, records the entry's source and every
other file's size, modification time and SHA-256. As in git's index, a file whose size and
modification time are those recorded is taken to be unchanged; any other file is hashed
(``full=True`` hashes every file).

Standard library only: the editing layer, the harness and bench/ all write through this module.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

MARKER_FORMAT = 1
# mkstemp and mkdtemp create owner-only modes; what is published is an ordinary shareable file or folder.
FILE_MODE = 0o644
FOLDER_MODE = 0o755
ASIDE_SUFFIX = ".old"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks: cache keys follow the data."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# (path, inode, size, mtime_ns) -> sha256: an unchanged file is hashed once per process, not at every lookup.
_HASHED: dict[tuple[str, int, int, int], str] = {}


def cached_sha256(path: str | Path) -> str:
    """:func:`file_sha256`, remembered for as long as the file keeps its inode, size and modification time."""
    st = os.stat(path)
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = file_sha256(path)
    return _HASHED[key]


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file name beside ``path`` for a writer that wants a name (safetensors, torch.save).

    When the block ends the file is renamed over ``path``; when it raises the file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- folders


def aside_path(dest: str | Path) -> Path:
    """Where :func:`replace_folder` keeps the old ``dest`` while the new one is renamed in."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}{ASIDE_SUFFIX}")


def current_folder(dest: str | Path) -> Path | None:
    """``dest``, or its aside copy where a replacement stopped between its two renames; None if neither."""
    dest = Path(dest)
    if dest.is_dir():
        return dest
    aside = aside_path(dest)
    return aside if aside.is_dir() else None


def replace_folder(new: str | Path, dest: str | Path) -> None:
    """Rename the finished folder ``new`` to ``dest``, never leaving a moment without a complete folder.

    An existing ``dest`` is renamed aside first and deleted after the new folder is in place.
    """
    new, dest = Path(new), Path(dest)
    aside = aside_path(dest)
    if dest.exists():
        if aside.exists():  # left by a replacement that stopped after its second rename
            shutil.rmtree(aside)
        os.rename(dest, aside)
    os.rename(new, dest)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)


def remove_folder(path: str | Path) -> None:
    """Delete a folder so that it vanishes at once: renamed to a hidden name first, then deleted."""
    path = Path(path)
    doomed = Path(tempfile.mkdtemp(prefix=f".{path.name}.del-", dir=path.parent))
    os.rename(path, doomed / path.name)
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(dest: str | Path, *, keep_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """An empty folder beside ``dest`` to fill; when the block ends it replaces ``dest`` (:func:`replace_folder`).

    An existing ``dest`` is kept instead if ``keep_existing(dest)`` (another process finished the same
    work first). When the block raises, the new folder is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists() and keep_existing is not None and keep_existing(dest):
            return
        os.chmod(tmp, FOLDER_MODE)
        for path in tmp.rglob("*"):
            os.chmod(path, FOLDER_MODE if path.is_dir() else FILE_MODE)
        replace_folder(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- verified entries


def write_marker(folder: str | Path, marker: str, source: dict, info: dict | None = None) -> dict:
    """Record ``source``, ``info`` and every file under ``folder`` in the file ``marker``; call it last."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != marker:
            st = path.stat()
            files[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}
    content = {"format": MARKER_FORMAT, "source": source, "files": files, **(info or {})}
    atomic_write_text(folder / marker, json.dumps(content, indent=1) + "\n")
    return content


def read_marker(folder: str | Path, marker: str) -> dict | None:
    """The marker's content, or None when it is missing, unreadable or of another format."""
    try:
        content = json.loads((Path(folder) / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) and content.get("format") == MARKER_FORMAT else None


def entry_is_complete(folder: str | Path, marker: str, source: dict | None = None, *, full: bool = False) -> bool:
    """Whether ``folder`` holds a finished entry (of ``source``, when given) whose files match its marker.

    Files whose size and modification time match the marker are trusted unless ``full``.
    """
    folder = Path(folder)
    content = read_marker(folder, marker)
    if content is None or not isinstance(content.get("files"), dict) or not content["files"]:
        return False
    if source is not None and content.get("source") != source:
        return False
    for name, recorded in content["files"].items():
        path = folder / name
        try:
            st = path.stat()
            if not path.is_file() or st.st_size != recorded["size"]:
                return False
            unchanged = st.st_mtime_ns == recorded.get("mtime_ns")
            if (full or not unchanged) and cached_sha256(path) != recorded["sha256"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True
