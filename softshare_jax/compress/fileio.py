"""Quantized files: safetensors with JSON metadata, checked before use, never pickle.

The layout (format version 2) is written out in :func:`save_quantized` and in
docs/design.md §4.5. A file is untrusted input: its header is parsed strictly,
everything it declares is checked against the file's own length before
anything is allocated, and a SHA-256 over the metadata and every tensor finds
any changed byte. Every way a file can be damaged or foreign raises
:class:`QuantizedFileError`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save as _st_save

from softshare_jax import files
from softshare_jax import masks
from softshare_jax.compress.filecheck import digest
from softshare_jax.compress.filecheck import DTYPES
from softshare_jax.compress.filecheck import FORMAT
from softshare_jax.compress.filecheck import FORMAT_VERSION
from softshare_jax.compress.filecheck import Invalid
from softshare_jax.compress.filecheck import Layout
from softshare_jax.compress.filecheck import check_layout
from softshare_jax.compress.filecheck import Leaf
from softshare_jax.compress.filecheck import MAX_HEADER_BYTES
from softshare_jax.compress.filecheck import METADATA_KEY
from softshare_jax.compress.filecheck import ST_DTYPES
from softshare_jax.compress.filecheck import ST_NAMES
from softshare_jax.compress.filecheck import stored_dtype
from softshare_jax.compress.filecheck import Tensor
from softshare_jax.compress.quantized import check_quantized
from softshare_jax.compress.quantized import is_qleaf
from softshare_jax.compress.quantized import Quantized
from softshare_jax.compress.quantized import QuantizedLeaf
from softshare_jax.compress.hashing import hashed_leaf

class QuantizedFileError(ValueError):
  """A file that :func:`load_quantized` cannot read: truncated, corrupted or foreign.

  A ``ValueError`` subclass, so ``except ValueError`` still catches it.
  """



# ----------------------------------------------------------------------------
# Save.


def _dtype_name(path: str, dtype: Any) -> str:
  try:
    name = np.dtype(jnp.dtype(dtype)).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise ValueError(f"quantized: leaf {path!r} has dtype {dtype!r}, which a quantized file cannot "
                     f"store; it stores {list(DTYPES)}.")
  return name


def save_quantized(path: str | os.PathLike, quantized: Quantized) -> None:
  """Writes a :class:`Quantized` to a safetensors file, atomically.

  Tensors: ``"<i>/codebook"`` (float32) and ``"<i>/indices"`` (the packed
  indices; none for hashed leaves, whose indices follow from the seed) for
  quantized leaf i, ``"<i>/value"`` for a kept leaf (bfloat16, float8 and
  complex64 travel as the unsigned int of their width). The safetensors
  metadata holds one JSON document under ``"softshare_jax"``: the format and
  version (2), each leaf's path (its key names, less an NNX Variable's
  trailing ``value``: :func:`softshare_jax.masks.key_names`), kind, shape,
  dtype, index bits and hash seed, and ``"sha256"``: a SHA-256 over the
  canonical JSON of the rest of that document (sorted keys, no spaces)
  followed by each tensor, by name, as the canonical JSON of ``[name,
  safetensors dtype, shape]`` and its bytes, every part preceded by its
  length as 8 little-endian bytes.

  The file is written as :func:`softshare_jax.files.atomic_path` describes: a
  temporary ``.<name>.softshare-tmp-*`` beside it, then a rename; through a
  symlink to its target; an existing file's permissions are kept; a missing
  folder raises ``FileNotFoundError``.

  Raises:
    ValueError: a leaf's dtype is not one a file stores, two leaves share a
      path, or hashed leaves declare more weights than :func:`load_quantized`
      accepts from a file this size; nothing is written.

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
    names = list(masks.key_names(keys))  # canonical: an nnx.State's "value" is not stored
    where = "/".join(names)
    if is_qleaf(leaf):
      book = np.asarray(jax.device_get(leaf.codebook), np.float32).reshape(-1)
      if not np.all(np.isfinite(book)):
        raise ValueError(f"quantized: leaf {where!r} has a non-finite codebook entry.")
      tensors[f"{i}/codebook"] = book
      entry = {"path": names, "kind": "quantized", "shape": [int(s) for s in leaf.shape],
               "dtype": _dtype_name(where, leaf.dtype), "bits": int(leaf.bits)}
      if leaf.hash_seed is None:
        tensors[f"{i}/indices"] = np.ascontiguousarray(jax.device_get(leaf.indices)).reshape(-1)
      else:
        entry.update(kind="hashed", hash_seed=int(leaf.hash_seed))
    else:
      a = np.asarray(jax.device_get(leaf))
      name = _dtype_name(where, a.dtype)
      tensors[f"{i}/value"] = np.require(a, requirements="C").view(stored_dtype(name))  # keeps 0-d 0-d
      entry = {"path": names, "kind": "array", "shape": list(a.shape), "dtype": name}
    entries.append(entry)
  meta = {"format": FORMAT, "version": FORMAT_VERSION, "leaves": entries}
  sha = digest(meta, [(n, ST_NAMES.get(a.dtype.name, "?"), a.shape, memoryview(a.reshape(-1).view(np.uint8)))
                       for n, a in tensors.items()])
  data = _st_save(tensors, metadata={METADATA_KEY: json.dumps({**meta, "sha256": sha})})
  try:  # Whatever load_quantized would refuse is refused here, before anything is written.
    check_layout(data[8:8 + int.from_bytes(data[:8], "little")], len(data))
  except Invalid as e:
    raise ValueError(f"quantized cannot be saved: {e}") from None
  files.write_bytes_atomic(path, data)


# ----------------------------------------------------------------------------
# Load.


def _read(path: Any) -> tuple[Layout, bytes]:
  """The checked layout and the tensor bytes; the data is read once, after the header passed."""
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
      raise Invalid(f"only {len(prefix)} bytes (truncated, or not a safetensors file).")
    n = int.from_bytes(prefix, "little")
    if n > min(size - 8, MAX_HEADER_BYTES):
      raise Invalid(f"its header claims {n} bytes but the file has {size - 8} after the length, and a "
                     f"header has at most {MAX_HEADER_BYTES} (truncated, or not a safetensors file).")
    layout = check_layout(f.read(n), size)  # a short read fails its size check
    data = f.read(size - 8 - n)
    if len(data) != size - 8 - n or f.read(1):
      raise Invalid("the file changed size while it was read.")
  return layout, data


def _view(data: bytes, t: Tensor) -> np.ndarray:
  return np.frombuffer(data, np.dtype(ST_DTYPES[t.st_dtype]), math.prod(t.shape), t.begin).reshape(t.shape)


def _max_packed_index(who: str, packed: np.ndarray, bits: int, size: int) -> int:
  """The largest index in ``packed``; the padding after the last index must be zero."""
  if size == 0 or bits >= 8:
    return int(packed.max()) if size else -1
  per, mask = 8 // bits, (1 << bits) - 1
  if int(packed[-1]) >> ((size - (packed.size - 1) * per) * bits):
    raise Invalid(f"{who}: the padding after its last index is not zero.")
  byte = np.arange(256)
  largest = np.max([(byte >> (j * bits)) & mask for j in range(per)], axis=0).astype(np.uint8)
  return int(largest[packed].max())  # a lookup per byte: no unpacked copy


def _leaf_from_file(i: int, leaf: Leaf, tensors: dict[str, Tensor], data: bytes) -> Any:
  who = f"leaf {i} ({leaf.name!r})"
  if leaf.kind == "array":
    value = _view(data, tensors[f"{i}/value"])
    if leaf.dtype == "bool" and value.size and value.view(np.uint8).max() > 1:
      raise Invalid(f"{who} is bool but holds bytes other than 0 and 1.")
    value = value.view(np.dtype(jnp.dtype(leaf.dtype)))
    if jax.dtypes.canonicalize_dtype(value.dtype) != value.dtype:  # 64-bit without jax_enable_x64
      return value.copy()  # a NumPy array: exact, where jnp.asarray would truncate
    return jnp.asarray(value)
  book = _view(data, tensors[f"{i}/codebook"])
  if not np.all(np.isfinite(book)):
    raise Invalid(f"{who} has a non-finite codebook entry.")
  if leaf.kind == "hashed":
    return hashed_leaf(np.array(book), leaf.shape, leaf.dtype, leaf.seed)
  packed = _view(data, tensors[f"{i}/indices"])
  largest = _max_packed_index(who, packed, leaf.bits, leaf.size)
  if largest >= book.size:
    raise Invalid(f"{who} has index {largest}, past its codebook of {book.size}.")
  return QuantizedLeaf(jnp.asarray(book), jnp.asarray(packed), leaf.shape, leaf.dtype, leaf.bits)


def load_quantized(path: str | os.PathLike, *, like: Any = None) -> Quantized:
  """Reads a file written by :func:`save_quantized`; checks all of it first.

  Nothing is unpickled, and nothing comes back from a file that fails a
  check: a truncated, corrupted or foreign file raises
  :class:`QuantizedFileError` (a ``ValueError``) saying which. Before any
  tensor is read, the header and metadata must be strict JSON (integers,
  strings, lists, objects; no repeated keys) in the version 2 schema: kinds
  and dtypes from closed lists, shapes of at most 32 dimensions whose nonzero
  product is at most 2**48, each tensor named by exactly one leaf with the
  dtype and shape that leaf implies, distinct paths. Then the SHA-256 finds
  any changed byte. Version 1 files, whose checksum left the metadata out,
  are refused.

  A hashed leaf stores no indices, so it is what grows when loaded (the
  indices are recomputed: about 20 bytes of temporaries per weight). A file's
  hashed leaves may declare at most max(2**24, 1024 × the file's bytes)
  weights in all (a 4096 × 4096 layer in any number of buckets; beyond that,
  about 4096 weights per 4-byte bucket), each at most 2**32, the hash's
  domain; :func:`save_quantized` refuses to write more.

  The tree comes back as nested dicts keyed by the path's key names; pass
  ``like`` (the original params, or a :class:`Quantized`) to get its
  structure instead (Flax ``FrozenDict``, ``nnx.State``, lists...): its
  leaves' canonical paths must be the file's, in order. Paths are canonical
  (an NNX Variable's trailing ``value`` left out), so a file saved from an
  ``nnx.State`` loads with ``like=`` a plain dict and the reverse. A kept
  64-bit leaf comes back as a NumPy array when ``jax_enable_x64`` is off, not
  truncated to 32 bits.

  Example: see :func:`save_quantized`.
  """
  try:
    layout, data = _read(path)
    views = [(n, t.st_dtype, t.shape, memoryview(data)[t.begin:t.end]) for n, t in layout.tensors.items()]
    if digest(layout.meta, views) != layout.sha256:
      raise Invalid("its checksum does not match its contents; the file is corrupted.")
    leaves = [_leaf_from_file(i, leaf, layout.tensors, data) for i, leaf in enumerate(layout.leaves)]
  except Invalid as e:
    raise QuantizedFileError(f"{os.fspath(path)!s} is not a readable softshare_jax quantized file: {e}") from None
  paths = [list(leaf.path) for leaf in layout.leaves]
  if like is not None:
    template = like.tree if isinstance(like, Quantized) else like
    flat, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=is_qleaf)
    want = [list(masks.key_names(keys)) for keys, _ in flat]
    # Files written before paths were canonical kept an nnx.State's "value": they match too.
    full = [[masks.path_str((k,)) for k in keys] for keys, _ in flat]
    if len(want) != len(paths) or any(p not in (w, f) for p, w, f in zip(paths, want, full)):
      raise ValueError(f"like: its leaves' paths {['/'.join(p) for p in want]} differ from the file's "
                       f"{['/'.join(p) for p in paths]}.")
    return Quantized(jax.tree_util.tree_unflatten(treedef, leaves))
  if paths == [[]]:  # the tree is one leaf (an empty path overlaps every other, so it is alone)
    return Quantized(leaves[0])
  tree: dict = {}
  for keys, leaf in zip(paths, leaves):
    node = tree
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return Quantized(tree)
