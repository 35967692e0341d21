"""sphere_fast.files: atomic file and folder writes, and verified cache entries."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from sphere_fast import files


class Crash(Exception):
    pass


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _fill(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text(text)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.bin").write_bytes(text.encode() * 3)
    return folder


def _content(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- files


def test_atomic_writes_replace_the_whole_file_with_an_ordinary_mode(tmp_path):
    target = tmp_path / "new" / "out.json"
    files.atomic_write_text(target, "first ü\n")
    files.atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second" and _mode(target) == files.FILE_MODE
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    files.atomic_write_text(target, "old")

    def disk_full(self, data):
        with open(self, "wb") as fh:
            fh.write(data[:2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_text(target, "a much longer new text")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    monkeypatch.undo()
    with pytest.raises(Crash):
        with files.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise Crash
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with files.atomic_path(target) as tmp:  # a writer that wants a name
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.txt.")
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_file_hashes(tmp_path):
    path = tmp_path / "data.bin"
    data = os.urandom(3 << 20 | 123)  # more than one read block, an odd tail
    path.write_bytes(data)
    assert files.file_sha256(path) == files.cached_sha256(path) == hashlib.sha256(data).hexdigest()
    path.write_bytes(data[:-1])
    assert files.cached_sha256(path) == hashlib.sha256(data[:-1]).hexdigest()


# --------------------------------------------------------------------------- folders


def test_atomic_folder_publishes_replaces_keeps_or_discards(tmp_path):
    dest = tmp_path / "entry"
    with files.atomic_folder(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".entry.tmp-")
        _fill(tmp / "x", "one")
    assert _content(dest) == {"x/a.txt": b"one", "x/sub/b.bin": b"oneoneone"}
    assert _mode(dest) == _mode(dest / "x") == files.FOLDER_MODE and _mode(dest / "x" / "a.txt") == files.FILE_MODE
    with files.atomic_folder(dest) as tmp:
        (tmp / "only.txt").write_text("two")
    assert _content(dest) == {"only.txt": b"two"}
    with files.atomic_folder(dest, keep_existing=lambda d: (d / "only.txt").is_file()) as tmp:
        (tmp / "other.txt").write_text("three")
    assert _content(dest) == {"only.txt": b"two"}
    with pytest.raises(Crash):
        with files.atomic_folder(dest) as tmp:
            (tmp / "half.txt").write_text("x")
            raise Crash
    assert _content(dest) == {"only.txt": b"two"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


@pytest.mark.parametrize("kill", [False, True], ids=["error", "kill"])
def test_replace_folder_stopped_at_any_step_leaves_one_complete_folder(tmp_path, monkeypatch, kill):
    """Each rename and deletion fails in turn (with ``kill``, nothing runs after it); a complete folder, old or
    new, is always found, and the next replacement goes through what was left."""
    outcomes = set()
    for step in range(1, 10):
        root = tmp_path / f"step-{step}"
        dest = _fill(root / "dest", "old")
        new = _fill(root / ".new", "new")
        seen, dead = [], []
        with monkeypatch.context() as patch:
            for owner, name in ((os, "rename"), (shutil, "rmtree")):
                def op(*args, _real=getattr(owner, name), _name=name, **kwargs):
                    if dead:
                        if kill:
                            return None
                        return _real(*args, **kwargs)
                    seen.append(_name)
                    if len(seen) == step:
                        dead.append(_name)
                        raise Crash
                    return _real(*args, **kwargs)
                patch.setattr(owner, name, op)
            try:
                files.replace_folder(new, dest)
            except Crash:
                pass
        found = files.current_folder(dest)
        assert found is not None, f"no folder after a stop at step {step}"
        outcomes.add(_content(found)["a.txt"].decode())
        assert _content(found) in ({"a.txt": b"old", "sub/b.bin": b"oldoldold"}, {"a.txt": b"new", "sub/b.bin": b"newnewnew"})
        again = _fill(root / ".again", "again")
        files.replace_folder(again, dest)
        assert files.current_folder(dest) == dest and _content(dest)["a.txt"] == b"again"
        assert not files.aside_path(dest).exists()
        if len(seen) < step:
            break
    assert step > 3 and outcomes == {"old", "new"}


def test_current_folder_and_remove_folder(tmp_path):
    dest = tmp_path / "batch-000001"
    assert files.current_folder(dest) is None
    _fill(files.aside_path(dest), "old")  # a replacement stopped between its two renames
    assert files.aside_path(dest).name == ".batch-000001.old" and files.current_folder(dest) == files.aside_path(dest)
    _fill(dest, "new")
    assert files.current_folder(dest) == dest
    files.remove_folder(dest)
    files.remove_folder(files.aside_path(dest))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- verified entries


MARKER = "marker.json"


def test_a_marker_records_every_file_and_verifies_them(tmp_path):
    entry = _fill(tmp_path / "entry", "data")
    written = files.write_marker(entry, MARKER, {"kind": "test"}, {"note": 1})
    assert json.loads((entry / MARKER).read_text()) == written
    assert written["format"] == files.MARKER_FORMAT and written["note"] == 1
    assert set(written["files"]) == {"a.txt", "sub/b.bin"}
    assert written["files"]["a.txt"]["sha256"] == hashlib.sha256(b"data").hexdigest()
    assert written["files"]["a.txt"]["size"] == 4
    assert files.read_marker(entry, MARKER) == written
    assert files.entry_is_complete(entry, MARKER) and files.entry_is_complete(entry, MARKER, {"kind": "test"})
    assert not files.entry_is_complete(entry, MARKER, {"kind": "other"})
    # Writing the marker again does not record the marker itself.
    assert set(files.write_marker(entry, MARKER, {"kind": "test"})["files"]) == {"a.txt", "sub/b.bin"}


def _flip_keeping_time(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("damage, quick_check_sees_it", [
    (lambda e: (e / "a.txt").write_text("longer data"), True),  # another size
    (lambda e: (e / "sub" / "b.bin").unlink(), True),  # a file missing
    (lambda e: (e / MARKER).unlink(), True),  # never finished
    (lambda e: (e / MARKER).write_text("{not json"), True),
    (lambda e: (e / MARKER).write_text(json.dumps({"format": files.MARKER_FORMAT + 1, "files": {}})), True),
    (lambda e: _flip_keeping_time(e / "a.txt"), False),  # same size and time: only a full check hashes it
], ids=["size", "missing", "no-marker", "garbled", "format", "same-size-and-time"])
def test_damage_is_detected(tmp_path, damage, quick_check_sees_it):
    entry = _fill(tmp_path / "entry", "data")
    files.write_marker(entry, MARKER, {"kind": "test"})
    damage(entry)
    assert files.entry_is_complete(entry, MARKER) is not quick_check_sees_it
    assert not files.entry_is_complete(entry, MARKER, full=True)


def test_a_changed_time_alone_is_hashed_and_accepted(tmp_path):
    entry = _fill(tmp_path / "entry", "data")
    files.write_marker(entry, MARKER, {"kind": "test"})
    os.utime(entry / "a.txt", ns=(1, 1))
    assert files.entry_is_complete(entry, MARKER)
