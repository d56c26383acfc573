"""Quantized files: safetensors with JSON metadata, checked before use, never pickle.

The layout (format version 3; version 2 still loads) is specified in
docs/file_format.md. A file is untrusted input: its header is parsed strictly,
everything it declares is checked against the file's own length before
anything is allocated, and a SHA-256 over the metadata and every tensor finds
any changed byte. Every way a file can be damaged or foreign raises
:class:`QuantizedFileError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softshare_jax import files
from softshare_jax import masks
from softshare_jax.compress.filecheck import digest_stream
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
from softshare_jax.compress.quantized import index_bits
from softshare_jax.compress.quantized import pack
from softshare_jax.compress.quantized import unpack
from softshare_jax.compress.hashing import hashed_leaf

_READ_CHUNK = 1 << 24  # bytes hashed at a time when a file is loaded


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


def _host(x: Any) -> np.ndarray:
  return np.ascontiguousarray(jax.device_get(x))


def _plan(quantized: Quantized) -> tuple[list[dict], dict[str, tuple[str, tuple[int, ...], Any]]]:
  """The leaves' metadata and each tensor's (dtype, shape, how to get its bytes), reading no data."""
  flat, _ = jax.tree_util.tree_flatten_with_path(quantized.tree, is_leaf=is_qleaf)
  entries, tensors = [], {}
  for i, (keys, leaf) in enumerate(flat):
    names = list(masks.key_names(keys))  # canonical: an nnx.State's "value" is not stored
    where = "/".join(names)
    if is_qleaf(leaf):
      if leaf.hash_seed is not None and leaf.axis is not None:
        raise ValueError(f"quantized: hashed leaf {where!r} has axis {leaf.axis}; hashed leaves have one codebook.")
      book_dtype = _dtype_name(where, leaf.codebook.dtype)
      if not np.all(np.isfinite(_host(leaf.codebook).astype(np.float32))):  # small: checked before writing
        raise ValueError(f"quantized: leaf {where!r} has a non-finite codebook entry.")
      tensors[f"{i}/codebook"] = (book_dtype, tuple(leaf.codebook.shape), leaf.codebook)
      if leaf.scale is not None:
        tensors[f"{i}/scale"] = ("float32", tuple(leaf.scale.shape), leaf.scale)
      entry = {"path": names, "kind": "quantized", "shape": [int(s) for s in leaf.shape],
               "dtype": _dtype_name(where, leaf.dtype), "bits": int(leaf.bits),
               "axis": None if leaf.axis is None else list(leaf.axis)}
      if leaf.hash_seed is None:
        tensors[f"{i}/indices"] = (np.dtype(leaf.indices.dtype).name, (int(np.size(leaf.indices)),), leaf.indices)
      else:
        entry.update(kind="hashed", hash_seed=int(leaf.hash_seed))
    else:
      name = _dtype_name(where, getattr(leaf, "dtype", np.asarray(leaf).dtype))
      tensors[f"{i}/value"] = (stored_dtype(name), tuple(np.shape(leaf)), leaf)
      entry = {"path": names, "kind": "array", "shape": [int(s) for s in np.shape(leaf)], "dtype": name}
    entries.append(entry)
  return entries, tensors


def _tensor_bytes(name: str, stored: str, source: Any) -> np.ndarray:
  """One tensor's bytes, on the host only while it is written."""
  a = _host(source)
  return a.reshape(-1).view(np.dtype(jnp.dtype(stored)) if a.dtype.itemsize else a.dtype).view(np.uint8)


def save_quantized(path: str | os.PathLike, quantized: Quantized) -> None:
  """Writes a :class:`Quantized` to a safetensors file, atomically, one tensor at a time.

  The layout (format version 3) is specified in docs/file_format.md, so a
  reader in any language can decode it with a safetensors library alone.
  Tensors: ``"<i>/codebook"`` (float32, bfloat16, float16 or int8; ``(K,)``
  or ``(groups, K)``), ``"<i>/scale"`` (float32, for int8 codebooks) and
  ``"<i>/indices"`` (the packed bit stream; none for hashed leaves, whose
  indices follow from the seed) for quantized leaf i, ``"<i>/value"`` for a
  kept leaf (bfloat16 as safetensors' BF16; float8 and complex64 travel as
  the unsigned int of their width). The safetensors metadata holds one JSON
  document under ``"softshare_jax"``: the format and version (3), each
  leaf's path (its key names, less an NNX Variable's trailing ``value``:
  :func:`softshare_jax.masks.key_names`), kind, shape, dtype, index bits,
  group axes and hash seed, and ``"sha256"``: a SHA-256 over the canonical
  JSON of the rest of that document (sorted keys, no spaces) followed by
  each tensor, by name, as the canonical JSON of ``[name, safetensors
  dtype, shape]`` and its bytes, every part preceded by its length as 8
  little-endian bytes.

  Memory: the header is laid out from the shapes alone; each tensor is
  brought to the host, hashed and written in turn (the digest, of fixed
  length, is filled in last), so saving needs O(largest leaf) host memory.

  The file is written as :func:`softshare_jax.files.atomic_path` describes: a
  temporary ``.<name>.softshare-tmp-*`` beside it, then a rename; through a
  symlink to its target; an existing file's permissions are kept; a missing
  folder raises ``FileNotFoundError``.

  Raises:
    ValueError: a leaf's dtype is not one a file stores, two leaves share a
      path, a codebook entry is not finite, or hashed leaves declare more
      weights than :func:`load_quantized` accepts from a file this size;
      nothing is written.

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
  entries, tensors = _plan(quantized)
  meta = {"format": FORMAT, "version": FORMAT_VERSION, "leaves": entries}
  order = sorted(tensors)  # the digest's order, and the data's
  header: dict[str, Any] = {}
  offset = 0
  for name in order:
    stored, shape, _ = tensors[name]
    nbytes = math.prod(shape) * np.dtype(jnp.dtype(stored)).itemsize
    header[name] = {"dtype": ST_NAMES[stored], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes

  def head(sha: str) -> bytes:
    text = json.dumps({"__metadata__": {METADATA_KEY: json.dumps({**meta, "sha256": sha})}, **header}).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    return len(text).to_bytes(8, "little") + text

  placeholder = head("0" * 64)
  try:  # Whatever load_quantized would refuse is refused here, before anything is written.
    check_layout(placeholder[8:], len(placeholder) + offset)
  except Invalid as e:
    raise ValueError(f"quantized cannot be saved: {e}") from None
  h = digest_stream(meta)
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(placeholder)
    for name in order:
      stored, shape, source = tensors[name]
      data = _tensor_bytes(name, stored, source)
      h.tensor(name, ST_NAMES[stored], shape, data)
      f.write(data)
    f.seek(0)
    f.write(head(h.hexdigest()))  # the same length: a digest is 64 hex digits
    f.flush()


# ----------------------------------------------------------------------------
# Load.


def _read_header(f: Any, size: int) -> tuple[Layout, int]:
  prefix = f.read(8)
  if len(prefix) < 8:
    raise Invalid(f"only {len(prefix)} bytes (truncated, or not a safetensors file).")
  n = int.from_bytes(prefix, "little")
  if n > min(size - 8, MAX_HEADER_BYTES):
    raise Invalid(f"its header claims {n} bytes but the file has {size - 8} after the length, and a "
                   f"header has at most {MAX_HEADER_BYTES} (truncated, or not a safetensors file).")
  return check_layout(f.read(n), size), 8 + n  # a short read fails its size check


def _read_tensor(f: Any, start: int, t: Tensor) -> np.ndarray:
  f.seek(start + t.begin)
  raw = f.read(t.end - t.begin)
  if len(raw) != t.end - t.begin:
    raise Invalid("the file changed size while it was read.")
  return np.frombuffer(raw, np.dtype(jnp.dtype(ST_DTYPES[t.st_dtype])), math.prod(t.shape)).reshape(t.shape)


def _check_indices(who: str, packed: np.ndarray, bits: int, size: int, k: int) -> None:
  """The padding bits after the last index are zero and no index is past its codebook row."""
  if size == 0 or bits == 0:
    return
  if bits <= 8:
    used = size * bits % 8
    if used and int(packed[-1]) >> used:
      raise Invalid(f"{who}: the padding after its last index is not zero.")
    largest = -1
    for s in range(0, size, 1 << 20):  # O(chunk) temporaries
      n = min(1 << 20, size - s)
      part = packed[s * bits // 8: -(-(s + n) * bits // 8)]
      largest = max(largest, int(unpack(part, bits, n, np).max()))
  else:
    largest = int(packed.max())
  if largest >= k:
    raise Invalid(f"{who} has index {largest}, past its codebook of {k}.")


def _leaf_from_file(i: int, leaf: Leaf, tensors: dict[str, Tensor], read) -> Any:
  who = f"leaf {i} ({leaf.name!r})"
  if leaf.kind == "array":
    value = read(f"{i}/value")
    if leaf.dtype == "bool" and value.size and value.view(np.uint8).max() > 1:
      raise Invalid(f"{who} is bool but holds bytes other than 0 and 1.")
    value = value.view(np.dtype(jnp.dtype(leaf.dtype)))
    if jax.dtypes.canonicalize_dtype(value.dtype) != value.dtype:  # 64-bit without jax_enable_x64
      return value.copy()  # a NumPy array: exact, where jnp.asarray would truncate
    return jnp.asarray(value)
  book = read(f"{i}/codebook")
  if not np.all(np.isfinite(book.astype(np.float32))):
    raise Invalid(f"{who} has a non-finite codebook entry.")
  scale = None
  if f"{i}/scale" in tensors:
    scale = read(f"{i}/scale")
    if not np.all(np.isfinite(scale)):
      raise Invalid(f"{who} has a non-finite scale.")
    scale = jnp.asarray(scale)
  if leaf.kind == "hashed":
    out = hashed_leaf(np.array(book), leaf.shape, leaf.dtype, leaf.seed)
    return out if scale is None else dataclasses.replace(out, scale=scale)
  packed = read(f"{i}/indices")
  _check_indices(who, packed, leaf.bits, leaf.size, book.shape[-1])
  bits = index_bits(book.shape[-1])
  if bits != leaf.bits:  # a version 2 leaf: repacked at ceil(log2 K) bits, as version 3 stores it
    packed = pack(unpack(packed, leaf.bits, leaf.size, np), bits)
  return QuantizedLeaf(jnp.asarray(book), jnp.asarray(packed), leaf.shape, leaf.dtype, bits, None,
                       leaf.axis, scale)


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
  any changed byte. Version 3 (docs/file_format.md) and version 2 files
  load; version 1 files, whose checksum left the metadata out, are refused.

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
    with open(path, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      layout, start = _read_header(f, size)
      # First the digest, over every tensor in name order, a chunk at a time; then one leaf at a time.
      h = digest_stream(layout.meta)
      for name in sorted(layout.tensors):
        t = layout.tensors[name]
        h.begin(name, t.st_dtype, t.shape, t.end - t.begin)
        f.seek(start + t.begin)
        for s in range(t.begin, t.end, _READ_CHUNK):
          chunk = f.read(min(_READ_CHUNK, t.end - s))
          if not chunk:
            raise Invalid("the file changed size while it was read.")
          h.update(chunk)
      if h.hexdigest() != layout.sha256:
        raise Invalid("its checksum does not match its contents; the file is corrupted.")
      leaves = [_leaf_from_file(i, leaf, layout.tensors, lambda name: _read_tensor(f, start, layout.tensors[name]))
                for i, leaf in enumerate(layout.leaves)]
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
