"""Reading files so that every failure names the file and what is wrong with it.

A truncated checkpoint shard, a corrupt JSON config or an unreadable data file
surfaces as :class:`FileFormatError` (a ``ValueError``) whose message starts with
the path, instead of a library's bare error. No JAX here.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["FileFormatError", "file_errors", "read_json", "read_safetensors", "open_safetensors"]


class FileFormatError(ValueError):
    """A file exists but cannot be read as what it should be."""


@contextlib.contextmanager
def file_errors(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Re-raise any failure inside the block as ``FileFormatError("<path>: <what>: …")``.

    ``FileNotFoundError`` and errors that already are :class:`FileFormatError` pass through.
    """
    try:
        yield
    except (FileNotFoundError, FileFormatError):
        raise
    except Exception as e:  # noqa: BLE001 - every reader's own error type, re-labelled
        raise FileFormatError(f"{os.fspath(path)}: cannot read {what}: "
                              f"{type(e).__name__}: {e}") from e


def read_json(path: str | os.PathLike, what: str = "JSON") -> Any:
    """Parse a JSON file; a missing file is ``FileNotFoundError``, a bad one names itself."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file ({what})")
    with file_errors(path, what):
        with open(path, encoding="utf-8") as f:
            return json.load(f)


def open_safetensors(path: str | os.PathLike, framework: str = "np"):
    """``safetensors.safe_open`` whose errors (truncated header, bad metadata) name the file."""
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such safetensors file")
    with file_errors(path, "safetensors (truncated or corrupt?)"):
        return safe_open(path, framework)


def read_safetensors(path: str | os.PathLike) -> dict:
    """Every tensor of a safetensors file as numpy arrays; errors name the file."""
    from safetensors.numpy import load_file
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such safetensors file")
    with file_errors(path, "safetensors (truncated or corrupt?)"):
        return load_file(path)
