"""Atomic file writes: a temporary file beside the target, then a rename.

A reader never sees a half-written file; a crash leaves the old file (or none)
in place. What a save does, in full:

- through a symlink it writes the link's target (the link stays a link);
- an existing file keeps its permission bits, and one without write
  permission raises ``PermissionError``, as ``open()`` would; a new file gets
  ``0o666`` less the umask, as ``open()`` gives it;
- a missing folder raises ``FileNotFoundError`` naming the folder (nothing is
  created);
- the temporary file is ``.<name>.softshare-tmp-<random><suffix>`` in the
  target's folder; it is removed when the write fails. A process killed
  mid-write (``kill -9``, power loss) cannot remove it, so the next save to
  the same target removes such leftovers: each writer holds an exclusive
  ``flock`` on its temporary file until it is renamed, and a temporary file
  nobody holds a lock on has lost its writer. (Without ``fcntl``, e.g. on
  Windows, leftovers stay.)

The rename gives the target a new inode: other hard links to the old file
keep the old contents, and the owner is the writer's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from typing import Iterator

try:
  import fcntl
except ImportError:  # Windows: no locks, so no cleanup of leftovers.
  fcntl = None

TEMP_MARK = ".softshare-tmp-"
_NAME_CHARS = 100  # of the target's name in a temp name, which must stay under NAME_MAX (255)


def resolve(path: str | os.PathLike) -> str:
  """The file a write to ``path`` goes to: symlinks followed, dangling ones too, as ``open()`` does."""
  real = os.path.realpath(path)
  if os.path.islink(real):  # realpath leaves a link in a loop unresolved
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.fspath(path))
  return real


def temp_prefix(target: str) -> str:
  """The name every temporary file for ``target`` starts with."""
  return f".{os.path.basename(target)[:_NAME_CHARS]}{TEMP_MARK}"


def _lock(fd: int, wait: bool) -> bool:
  if fcntl is None:
    return True
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
  except BlockingIOError:
    return False
  return True


def remove_stale_temps(target: str) -> list[str]:
  """Removes the temporary files for ``target`` whose writer is gone; returns their paths."""
  if fcntl is None:
    return []
  directory, prefix = os.path.dirname(target), temp_prefix(target)
  try:
    names = [n for n in os.listdir(directory) if n.startswith(prefix)]
  except OSError:
    return []
  removed = []
  for name in names:
    tmp = os.path.join(directory, name)
    try:
      fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:  # gone already, or a link: not one of ours
      continue
    try:
      if stat.S_ISREG(os.fstat(fd).st_mode) and _lock(fd, wait=False) and os.path.samestat(os.stat(tmp), os.fstat(fd)):
        os.unlink(tmp)
        removed.append(tmp)
    except FileNotFoundError:  # another save removed it first
      pass
    finally:
      os.close(fd)
  return removed


def _create_temp(target: str, suffix: str) -> tuple[int, str]:
  """A new temporary file for ``target``, open and locked; ``0o666`` less the umask."""
  prefix = os.path.join(os.path.dirname(target), temp_prefix(target))
  for _ in range(100):
    tmp = f"{prefix}{secrets.token_hex(4)}{suffix}"
    try:
      fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except FileExistsError:
      continue
    _lock(fd, wait=True)
    try:  # Between create and lock a cleanup may have taken it for a leftover.
      if os.path.samestat(os.stat(tmp), os.fstat(fd)):
        return fd, tmp
    except FileNotFoundError:
      pass
    os.close(fd)
  raise FileExistsError(errno.EEXIST, "no free temporary file name", prefix)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path to write; on success it is renamed to ``path`` (see the module doc).

  The temporary file already exists (empty) and is fsynced before the rename.

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> with atomic_path(path) as tmp:
    ...   with open(tmp, "w") as f:
    ...     _ = f.write("hello")
    >>> open(path).read(), os.listdir(os.path.dirname(path))
    ('hello', ['a.txt'])
  """
  target = resolve(path)
  directory = os.path.dirname(target)
  if not os.path.isdir(directory):
    raise FileNotFoundError(errno.ENOENT, "No such folder (a save creates no folders)", directory)
  remove_stale_temps(target)
  try:
    mode = stat.S_IMODE(os.stat(target).st_mode)
  except FileNotFoundError:
    mode = None
  if mode is not None and not os.access(target, os.W_OK):  # the rename would not need it
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), target)
  fd, tmp = _create_temp(target, suffix)
  try:
    yield tmp
    os.fsync(fd)  # the inode's data, whichever descriptor wrote it
    if mode is not None:
      os.chmod(tmp, mode)
    os.replace(tmp, target)
  finally:
    with contextlib.suppress(FileNotFoundError):
      if os.path.samestat(os.stat(tmp), os.fstat(fd)):
        os.unlink(tmp)
    os.close(fd)  # releases the lock


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
  with atomic_path(path, suffix=os.path.splitext(os.fspath(path))[1]) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
