"""Quantized files: safetensors with JSON metadata, written atomically, never pickle.

The layout is documented in docs/design.md §4.5 and in
:func:`save_quantized`. Every way a file can be damaged or foreign raises
:class:`QuantizedFileError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from softshare_jax import _files
from softshare_jax import masks
from softshare_jax.compress._format import check_quantized
from softshare_jax.compress._format import index_bits
from softshare_jax.compress._format import is_qleaf
from softshare_jax.compress._format import Quantized
from softshare_jax.compress._format import QuantizedLeaf
from softshare_jax.compress._hashing import hashed_leaf

_FORMAT = "softshare_jax.quantized"
_FORMAT_VERSION = 1
_METADATA_KEY = "softshare_jax"


class QuantizedFileError(ValueError):
  """A file that :func:`load_quantized` cannot read: truncated, corrupted or foreign.

  A ``ValueError`` subclass, so ``except ValueError`` still catches it.
  """


def _storable(a: np.ndarray) -> np.ndarray:
  """Dtypes safetensors' NumPy API lacks (bfloat16, float8) travel as unsigned ints of their width."""
  if a.dtype.kind in "fiub" and a.dtype.name in ("float16", "float32", "float64", "bool") + tuple(
      f"{s}int{b}" for s in ("", "u") for b in (8, 16, 32, 64)):
    return a
  return a.view(np.dtype(f"uint{a.dtype.itemsize * 8}"))


def _digest(tensors: dict[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def save_quantized(path: str | os.PathLike, quantized: Quantized) -> None:
  """Writes a :class:`Quantized` to a safetensors file, atomically.

  Tensors: ``"<i>/codebook"`` (float32) and ``"<i>/indices"`` (the packed
  indices; none for hashed leaves, whose indices follow from the seed) for
  quantized leaf i, ``"<i>/value"`` for a kept leaf. The safetensors metadata
  holds one JSON document under ``"softshare_jax"``: the format and version,
  each leaf's path, kind, shape, dtype, index bits and hash seed, and a SHA-256
  of all the tensors so that a corrupted file is detected on load. The file
  is written to a temporary file in the same folder and renamed.

  Example:
    >>> import os, tempfile, jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> q = ss.quantize({"w": jnp.array([[0.5, 0.0], [0.5, -0.5]])}, None)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> ss.save_quantized(path, q)
    >>> ss.dequantize(ss.load_quantized(path))["w"]
    Array([[ 0.5,  0. ], [ 0.5, -0.5]], dtype=float32)
  """
  check_quantized(quantized)
  flat, _ = jax.tree_util.tree_flatten_with_path(quantized.tree, is_leaf=is_qleaf)
  tensors, entries = {}, []
  for i, (keys, leaf) in enumerate(flat):
    names = [masks.path_str((k,)) for k in keys]
    if is_qleaf(leaf):
      tensors[f"{i}/codebook"] = np.asarray(leaf.codebook, np.float32)
      if leaf.hash_seed is None:
        tensors[f"{i}/indices"] = np.asarray(leaf.indices)
      entries.append({"path": names, "kind": "hashed" if leaf.hash_seed is not None else "quantized",
                      "shape": list(leaf.shape), "dtype": leaf.dtype, "bits": leaf.bits,
                      "hash_seed": leaf.hash_seed})
    else:
      a = np.asarray(jax.device_get(leaf))
      tensors[f"{i}/value"] = np.ascontiguousarray(_storable(a))
      entries.append({"path": names, "kind": "array", "shape": list(a.shape), "dtype": a.dtype.name})
  info = {"format": _FORMAT, "version": _FORMAT_VERSION, "leaves": entries, "sha256": _digest(tensors)}
  _files.write_bytes_atomic(path, _st_save(tensors, metadata={_METADATA_KEY: json.dumps(info)}))


def _bad_file(path: Any, why: str) -> QuantizedFileError:
  return QuantizedFileError(f"{os.fspath(path)!s} is not a readable softshare_jax quantized file: {why}")


def _read_info(path: Any, data: bytes) -> dict:
  if len(data) < 8:
    raise _bad_file(path, f"only {len(data)} bytes (truncated, or not a safetensors file).")
  n = int.from_bytes(data[:8], "little")
  if n > len(data) - 8:
    raise _bad_file(path, f"its header claims {n} bytes but the file has {len(data) - 8} after the "
                    "length (truncated, or not a safetensors file).")
  try:
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__") or {}
  except (ValueError, AttributeError) as e:
    raise _bad_file(path, f"its header is not valid JSON ({e}); the file is corrupted.") from None
  if _METADATA_KEY not in meta:
    raise _bad_file(path, "no 'softshare_jax' metadata; it was not written by ss.save_quantized "
                    "(a plain safetensors checkpoint?).")
  try:
    info = json.loads(meta[_METADATA_KEY])
  except ValueError as e:
    raise _bad_file(path, f"its metadata is not valid JSON ({e}).") from None
  if not isinstance(info, dict) or info.get("format") != _FORMAT:
    raise _bad_file(path, f"unknown format {info.get('format') if isinstance(info, dict) else info!r}.")
  if info.get("version") != _FORMAT_VERSION:
    raise _bad_file(path, f"format version {info.get('version')!r}; this softshare_jax reads "
                    f"version {_FORMAT_VERSION}.")
  return info


def _leaf_from_file(path: Any, i: int, entry: dict, tensors: dict[str, np.ndarray]) -> Any:
  kind, shape, dtype = entry["kind"], tuple(int(s) for s in entry["shape"]), np.dtype(jnp.dtype(entry["dtype"]))
  if kind == "array":
    a = tensors[f"{i}/value"]
    return jnp.asarray(a.view(dtype) if a.dtype != dtype else a).reshape(shape)
  book = tensors[f"{i}/codebook"]
  if book.dtype != np.float32 or book.ndim != 1:
    raise _bad_file(path, f"leaf {i}'s codebook is {book.dtype}{list(book.shape)}, not float32[K].")
  if kind == "hashed":
    return hashed_leaf(book, shape, dtype.name, int(entry["hash_seed"]))
  bits = int(entry["bits"])
  packed = tensors[f"{i}/indices"]
  size = math.prod(shape)
  expected = size if bits >= 8 else -(-size // (8 // bits))
  if bits != index_bits(book.size) or packed.dtype != np.dtype(f"uint{max(bits, 8)}") or packed.size != expected:
    raise _bad_file(path, f"leaf {i}'s indices ({packed.dtype}[{packed.size}]) do not fit {bits}-bit "
                    f"indices of {size} weights into a codebook of {book.size}.")
  leaf = QuantizedLeaf(jnp.asarray(book), jnp.asarray(packed), shape, dtype.name, bits)
  if size and int(jnp.max(leaf.unpacked())) >= book.size:
    raise _bad_file(path, f"leaf {i} has an index past its codebook of {book.size}.")
  return leaf


def load_quantized(path: str | os.PathLike, *, like: Any = None) -> Quantized:
  """Reads a file written by :func:`save_quantized`; checks it first.

  A truncated, corrupted (checksum) or foreign file raises a
  :class:`QuantizedFileError` (a ``ValueError``) that says which; nothing is
  ever unpickled. The tree comes back as nested dicts
  keyed by the path's key names; pass ``like`` (the original params, or a
  :class:`Quantized`) to get its structure instead (Flax ``FrozenDict``,
  ``nnx.State``, lists...): its leaves' paths must match the file's.

  Example: see :func:`save_quantized`.
  """
  with open(path, "rb") as f:
    data = f.read()
  info = _read_info(path, data)
  try:
    tensors = _st_load(data)
  except Exception as e:  # noqa: BLE001 - safetensors raises its own error types.
    raise _bad_file(path, f"its tensor data cannot be read ({e}); the file is truncated or corrupted.") from None
  if _digest(tensors) != info.get("sha256"):
    raise _bad_file(path, "its checksum does not match its tensors; the file is corrupted.")
  try:
    entries = info["leaves"]
    leaves = [_leaf_from_file(path, i, e, tensors) for i, e in enumerate(entries)]
    paths = [list(map(str, e["path"])) for e in entries]
  except QuantizedFileError:
    raise
  except (KeyError, TypeError, ValueError) as e:
    raise _bad_file(path, f"its metadata does not describe its tensors ({e!r}).") from None
  if like is not None:
    template = like.tree if isinstance(like, Quantized) else like
    flat, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=is_qleaf)
    want = [[masks.path_str((k,)) for k in keys] for keys, _ in flat]
    if want != paths:
      raise ValueError(f"like: its leaves' paths {['/'.join(p) for p in want]} differ from the file's "
                       f"{['/'.join(p) for p in paths]}.")
    return Quantized(jax.tree_util.tree_unflatten(treedef, leaves))
  tree: dict = {}
  for keys, leaf in zip(paths, leaves):
    node = tree
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    if not keys:
      return Quantized(leaf)
    node[keys[-1]] = leaf
  return Quantized(tree)
