"""Writing files atomically (temporary file, then rename) with the permissions an ordinary write would give.

A reader, or a run killed mid-write, sees the whole file or none. `tempfile.mkstemp` (and safetensors, which
writes the same way) creates files readable by their owner only; `respect_umask` gives them the mode `open()` would
have (0o666 less the umask), so other users of a shared output directory can read the results and weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "respect_umask", "write_json_atomic", "write_text_atomic"]


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def respect_umask(path: str | os.PathLike) -> None:
    """Give `path` (a file, or every file under a directory) the mode a plain `open()` would: 0o666 & ~umask."""
    mode = 0o666 & ~_umask()
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        if file.stat().st_mode & 0o777 != mode:
            os.chmod(file, mode)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` (with the umask's mode) when the block ends
    without an exception, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        respect_umask(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any, **dump_kwargs: Any) -> None:
    """`data` as indented JSON at `path`, atomically."""
    dump_kwargs = {"indent": 2, "ensure_ascii": False, **dump_kwargs}
    write_text_atomic(path, json.dumps(data, **dump_kwargs))
