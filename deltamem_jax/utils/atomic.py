"""The one way this package writes files: atomically, so nothing half-written is ever seen.

A file is written to a temporary name in its own directory, flushed and
fsync'ed, then renamed over the target (``os.replace`` is atomic on POSIX and
Windows); the directory is fsync'ed so the rename survives a power cut. A
reader sees the old file or the new one, never a torn one; a crash leaves at
most a hidden ``.<name>.*.tmp`` file that the next write of the same target
removes.

A directory (an adapter, an HF export, a session snapshot) is built under a
temporary name next to the target and swapped in as a whole by
:func:`atomic_directory`.

No JAX here: every room may import this.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_file",
           "append_lines", "atomic_directory", "fsync_dir"]

PathLike = str | os.PathLike


def fsync_dir(path: PathLike) -> None:
    """fsync a directory so that renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _clean_stale(path: Path) -> None:
    pattern = os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*.tmp")
    for stale in glob.glob(pattern):
        try:
            os.unlink(stale)
        except OSError:
            pass


@contextlib.contextmanager
def atomic_file(path: PathLike, *, fsync: bool = True) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; on success rename it over ``path``.

    For libraries that write by file name (``safetensors.numpy.save_file``,
    ``np.savez``)::

        with atomic_file("model.safetensors") as tmp:
            save_file(tensors, tmp)

    On an exception the temporary file is removed and ``path`` is untouched.
    Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_file(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, *, fsync: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2,
                      default: Callable | None = None, fsync: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=default) + "\n",
                             fsync=fsync)


@contextlib.contextmanager
def atomic_directory(path: PathLike, *, fsync: bool = True) -> Iterator[str]:
    """Yield an empty temporary directory next to ``path``; on success it becomes ``path``.

    An existing ``path`` is replaced as a whole: it is renamed aside, the new
    directory renamed in, and the old one deleted. (Between the two renames a
    reader may briefly find no ``path``; it never finds a partial one. Callers
    that need a reader to always find *a* complete version keep versioned
    directories and point at the current one with :func:`atomic_write_text`.)
    On an exception the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(os.path.abspath(os.fspath(path)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmpdir", dir=path.parent)
    try:
        yield tmp
        if fsync:
            for root, _, files in os.walk(tmp):
                for name in files:
                    with open(os.path.join(root, name), "rb") as fh:
                        os.fsync(fh.fileno())
                fsync_dir(root)
        if path.exists():
            old = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def append_lines(path: PathLike, lines: list[str], *, fsync: bool = True) -> Path:
    """Append whole lines to ``path`` so that a reader never sees a torn one as complete.

    All ``lines`` go out in one ``write`` on an ``O_APPEND`` descriptor, then fsync. A crash
    mid-write can leave a partial last line without its newline; the next call first cuts
    the file back to its last newline, so complete lines are never glued to a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line.rstrip("\n") + "\n" for line in lines).encode("utf-8")
    with open(path, "ab+") as fh:
        end = fh.seek(0, os.SEEK_END)
        if end:
            fh.seek(end - 1)
            if fh.read(1) != b"\n":
                fh.seek(0)
                content = fh.read()
                fh.truncate(content.rfind(b"\n") + 1)
        fh.write(data)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    return path
