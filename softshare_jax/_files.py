"""Atomic file writes: a temporary file in the target's folder, then a rename.

A reader never sees a half-written file, and a crash leaves the old file (or
none) in place, plus no stray temporary file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path to write; on success it is renamed to ``path``.

  The file gets the usual permissions (``0o666`` less the umask; ``mkstemp``
  would leave it private) and is fsynced before the rename.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
  os.close(fd)
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically."""
  with atomic_path(path, suffix=os.path.splitext(os.fspath(path))[1]) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
