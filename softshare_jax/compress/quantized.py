"""The compressed format: :class:`QuantizedLeaf`, :class:`Quantized`, index packing, codebooks.

A quantized tensor is a codebook per group plus one packed index per weight.
Indices take ceil(log2 K) bits (at least 1, so 1..8), packed densely
as one little-endian bit stream (index i in bits [i·b, (i+1)·b), the first
index in the lowest bits of the first byte: a 3-bit stream crosses byte
boundaries); hashing keeps 16 or 32 bits past 256 buckets. Every quantizer
builds its leaves here (:func:`leaf_from_values`, :func:`leaf_from_entries`),
so a leaf means the same thing whoever made it. docs/file_format.md writes out
the layout for readers in other languages.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softshare_jax import masks
from softshare_jax.groups import Axis
from softshare_jax.groups import group_axes

MAX_CODEBOOK = 256  # entries per group: quantize and cluster_weights pack at most 8 bits per index.
CODEBOOK_DTYPES = ("float32", "bfloat16", "float16", "int8")
INT8_LEVELS = 127  # int8 entries are in [-127, 127]: symmetric, so a scale maps ±max exactly
_PACK_CHUNK = 1 << 20  # indices packed at a time (8 bytes of temporaries each)


# ----------------------------------------------------------------------------
# The pytree.


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codebook", "indices", "scale"],
    meta_fields=["shape", "dtype", "bits", "hash_seed", "axis"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedLeaf:
  """One quantized tensor: a codebook per group and one packed index per weight.

  Attributes:
    codebook: the shared values. ``(K,)`` for one group (``axis=None``), else
      ``(groups, K)``: row g is group g's codebook, groups in C order of the
      axes NOT in ``axis`` (as :func:`softshare_jax.groups.to_rows` makes
      them). From :func:`quantize` and :func:`cluster_weights` each row is
      sorted, distinct and all in use up to its own count; a row with fewer
      entries than K is padded by repeating its last (largest) entry, so any
      index < K decodes to a value of the group. From :func:`hash_clusters`
      entry b is bucket b. float32 (default), bfloat16, float16 or int8.
    indices: the packed indices, one per weight in C order of ``shape``: a
      uint8 bit stream for ``bits`` 1..8 (K = 1 also takes 1 bit),
      ``uint16``/``uint32`` for 16/32.
    scale: for an int8 codebook, float32 of shape ``codebook.shape[:-1]``: an
      entry's value is ``float32(entry) * scale`` of its group; else None.
    shape: the tensor's shape (static).
    dtype: the tensor's dtype name, e.g. ``"float32"``, ``"bfloat16"`` (static).
    bits: bits per index: 1..8, 16 or 32 (static; 0 only in hand-made leaves).
    hash_seed: the hash seed for :func:`hash_clusters` leaves, else None
      (static). A hashed leaf's indices are a function of the seed, so an
      export stores only the codebook.
    axis: the sorted axes that form one group, or None for the whole tensor
      (static).
  """

  codebook: jax.Array
  indices: jax.Array
  shape: tuple[int, ...]
  dtype: str
  bits: int
  hash_seed: int | None = None
  axis: tuple[int, ...] | None = None
  scale: jax.Array | None = None

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def groups(self) -> int:
    """Number of groups (codebook rows); 1 when ``axis`` is None."""
    return 1 if self.axis is None else math.prod(s for a, s in enumerate(self.shape) if a not in self.axis)

  @property
  def entries(self) -> int:
    """K: entries per codebook row."""
    return int(self.codebook.shape[-1])

  def unpacked(self) -> jax.Array:
    """``(size,)`` int32 codebook indices, in C order of ``shape`` (traceable)."""
    return unpack(jnp.asarray(self.indices), self.bits, self.size)

  def group_ids(self) -> jax.Array:
    """``shape``-shaped int32 group of each weight (traceable; zeros when ``axis`` is None)."""
    return group_ids(self.shape, self.axis, jnp)

  def table(self) -> jax.Array:
    """The codebook's values in float32 (int8 entries times their group's scale), traceable."""
    book = jnp.asarray(self.codebook).astype(jnp.float32)
    if self.scale is not None:
      book = book * jnp.asarray(self.scale, jnp.float32)[..., None]
    return book

  def values(self) -> jax.Array:
    """The dequantized tensor: codebook values, in ``shape`` and ``dtype`` (traceable).

    The one decoder of a leaf: one gather per weight from the flattened
    ``(groups, K)`` table, no unpacked copy of the codebook per weight.
    """
    book, idx = self.table(), self.unpacked()
    if self.size == 0:
      return jnp.zeros(self.shape, jnp.dtype(self.dtype))
    if self.axis is None:
      out = book[idx]
    else:
      out = book.reshape(-1)[self.group_ids().reshape(-1) * self.entries + idx]
    return out.reshape(self.shape).astype(jnp.dtype(self.dtype))


def is_qleaf(x: Any) -> bool:
  return isinstance(x, QuantizedLeaf)


def is_qleaf_or_none(x: Any) -> bool:
  return x is None or isinstance(x, QuantizedLeaf)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["tree"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Quantized:
  """A compressed parameter tree; a pytree.

  ``tree`` has the structure of the params, with a :class:`QuantizedLeaf` in
  place of each quantized leaf and the other leaves as they were. Read it with
  :func:`dequantize`, size it with :func:`compression_report`, store it with
  :func:`save_quantized`.
  """

  tree: Any

  def leaves_with_paths(self) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs, a :class:`QuantizedLeaf` counted as one leaf.

    Paths are canonical (:func:`softshare_jax.masks.canonical_path`): a tree
    quantized from an ``nnx.State`` names its leaves as one quantized from
    ``nnx.to_pure_dict(state)`` does (``"conv/kernel"``, no ``"value"``).
    """
    return masks.leaves_with_paths(self.tree, is_leaf=is_qleaf)


def check_quantized(quantized: Any) -> Quantized:
  """``quantized`` if it is a :class:`Quantized`."""
  if not isinstance(quantized, Quantized):
    raise ValueError(f"quantized must be a Quantized, got {type(quantized).__name__}.")
  return quantized


# ----------------------------------------------------------------------------
# Groups.


def normalize_axis(shape: tuple[int, ...], axis: Axis) -> tuple[int, ...] | None:
  """The sorted group axes, or None when they are all the axes (one group)."""
  if axis is None:
    return None
  axes = group_axes(len(shape), axis)
  return None if len(axes) == len(shape) else axes


def group_ids(shape: tuple[int, ...], axis: tuple[int, ...] | None, xp: Any = np) -> Any:
  """``shape``-shaped group index of each weight: C order over the axes not in ``axis``."""
  if axis is None:
    return xp.zeros(shape, xp.int32)
  rest = [a for a in range(len(shape)) if a not in axis]
  out, stride = xp.zeros((1,) * len(shape), xp.int32), 1
  for a in reversed(rest):
    dims = [1] * len(shape)
    dims[a] = shape[a]
    out = out + (xp.arange(shape[a], dtype=xp.int32) * stride).reshape(dims)
    stride *= shape[a]
  return xp.broadcast_to(out, shape)


def to_rows_np(x: np.ndarray, axis: tuple[int, ...] | None) -> np.ndarray:
  """``(groups, d)`` rows of ``x`` (NumPy, as :func:`softshare_jax.groups.to_rows`)."""
  if axis is None:
    return x.reshape(1, -1)
  rest = tuple(a for a in range(x.ndim) if a not in axis)
  groups = math.prod(x.shape[a] for a in rest)
  return np.transpose(x, rest + axis).reshape(groups, math.prod(x.shape[a] for a in axis))


def from_rows_np(rows: np.ndarray, shape: tuple[int, ...], axis: tuple[int, ...] | None) -> np.ndarray:
  """The inverse of :func:`to_rows_np`: ``rows`` back in C order of ``shape``."""
  if axis is None:
    return rows.reshape(shape)
  rest = tuple(a for a in range(len(shape)) if a not in axis)
  moved = rows.reshape([shape[a] for a in rest + axis])
  return np.transpose(moved, np.argsort(rest + axis))


# ----------------------------------------------------------------------------
# Index packing.


def index_bits(num_entries: int) -> int:
  """ceil(log2 K) bits, at least 1; 16 or 32 past 256.

  K = 1 takes 1 bit, not 0: every non-empty leaf then has a non-empty index
  array, which checkpointers such as Orbax need (they refuse zero-size
  arrays); the size report still counts 0 bits for it (Deep Compression).
  """
  if num_entries <= 256:
    return max(1, int(num_entries - 1).bit_length())
  return 16 if num_entries <= 1 << 16 else 32


def packed_size(size: int, bits: int) -> int:
  """Elements of the packed array: bytes of the bit stream for bits <= 8."""
  return size if bits > 8 else -(-size * bits // 8)


def pack(idx: np.ndarray, bits: int) -> np.ndarray:
  """Packs indices into the little-endian bit stream (1..8 bits) or ``uint{bits}`` (16, 32)."""
  idx = np.asarray(idx).ravel()
  if bits > 8:
    return idx.astype(np.dtype(f"uint{bits}"))
  out = np.zeros(packed_size(idx.size, bits), np.uint8)
  if bits == 0 or idx.size == 0:
    return out
  shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
  for s in range(0, idx.size, _PACK_CHUNK):  # 8 indices make `bits` whole bytes
    part = idx[s:s + _PACK_CHUNK]
    blocks = np.zeros((-(-part.size // 8), 8), np.uint64)
    blocks.reshape(-1)[:part.size] = part
    word = np.bitwise_or.reduce(blocks << shifts, axis=1).astype("<u8")
    stream = word.view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)
    begin = s * bits // 8
    out[begin:begin + stream.size] = stream[:out.size - begin]
  return out


def unpack(packed: Any, bits: int, size: int, xp: Any = jnp) -> Any:
  """``(size,)`` int32 indices from :func:`pack`'s output; ``xp`` is ``jnp`` (traceable) or ``np``.

  Eight indices of b bits fill b whole bytes, so each index is cut from at
  most two bytes at static positions: slices and shifts, no gather.
  """
  if bits == 0:
    return xp.zeros((size,), xp.int32)
  if bits > 8:
    return packed.reshape(-1)[:size].astype(xp.int32)
  blocks = -(-size // 8)
  flat = packed.reshape(-1)
  pad = blocks * bits - flat.shape[0]
  if pad > 0:
    flat = xp.concatenate([flat, xp.zeros((pad,), flat.dtype)])
  b = flat[:blocks * bits].reshape(blocks, bits).astype(xp.uint32)
  mask = (1 << bits) - 1
  fields = []
  for j in range(8):
    lo, sh = divmod(j * bits, 8)
    v = b[:, lo] >> sh
    if sh + bits > 8:
      v = v | (b[:, lo + 1] << (8 - sh))
    fields.append(v & mask)
  return xp.stack(fields, axis=1).reshape(-1)[:size].astype(xp.int32)


# ----------------------------------------------------------------------------
# Codebooks.


def check_codebook_dtype(codebook_dtype: Any) -> str:
  """The codebook dtype's name, if it is one of :data:`CODEBOOK_DTYPES`."""
  try:
    name = codebook_dtype if isinstance(codebook_dtype, str) else jnp.dtype(codebook_dtype).name
  except TypeError:
    name = None
  if name not in CODEBOOK_DTYPES:
    raise ValueError(f"codebook_dtype must be one of {list(CODEBOOK_DTYPES)}, got {codebook_dtype!r}.")
  return name


def leaf_rounded(values: np.ndarray, dtype: Any) -> np.ndarray:
  """``values`` rounded to the leaf's dtype, as float32 with -0 made +0 (what the leaf decodes to)."""
  return np.asarray(values).astype(np.dtype(dtype)).astype(np.float32) + np.float32(0)


def codebook_keys(v: np.ndarray, codebook_dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
  """Each row's values as codebook entries (float32 holding them exactly) and the int8 scales.

  ``v`` is ``(groups, n)`` float32; rounding is monotone, so sorted values
  give sorted entries. An int8 group's scale is max|v| / 127 (1 for an
  all-zero group), so its largest magnitude is exactly ±127 · scale.
  """
  if codebook_dtype == "float32":
    return v, None
  if codebook_dtype != "int8":
    return v.astype(jnp.dtype(codebook_dtype)).astype(np.float32), None
  peak = np.max(np.abs(v), axis=1) if v.shape[1] else np.zeros(v.shape[0], np.float32)
  scale = np.where(peak > 0, peak.astype(np.float64) / INT8_LEVELS, 1.0).astype(np.float32)
  keys = np.clip(np.rint(v.astype(np.float64) / scale[:, None]), -INT8_LEVELS, INT8_LEVELS)
  return keys.astype(np.float32), scale


def _row_unique(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per row: the padded ``(groups, K)`` sorted distinct keys, their counts, each key's entry."""
  g, d = keys.shape
  if d == 0:
    return np.zeros((g, 0), np.float32), np.zeros(g, np.int64), np.zeros((g, 0), np.int64)
  if g == 1:
    book, inv = np.unique(keys[0], return_inverse=True)
    return book[None], np.array([book.size]), inv.reshape(1, d)
  order = np.argsort(keys, axis=1, kind="stable")
  s = np.take_along_axis(keys, order, axis=1)
  new = np.ones((g, d), bool)
  new[:, 1:] = s[:, 1:] != s[:, :-1]
  rank = np.cumsum(new, axis=1) - 1
  counts = rank[:, -1] + 1
  book = np.repeat(s[:, -1:], int(counts.max()), axis=1)  # padding: each row's last entry
  rows = np.broadcast_to(np.arange(g)[:, None], (g, d))
  book[rows[new], rank[new]] = s[new]
  inverse = np.empty((g, d), np.int64)
  np.put_along_axis(inverse, order, rank, axis=1)
  return book, counts, inverse


def leaf_from_entries(path: str, book: np.ndarray, idx: np.ndarray, scale: np.ndarray | None,
                      shape: tuple[int, ...], dtype: Any, axis: tuple[int, ...] | None,
                      codebook_dtype: str) -> QuantizedLeaf:
  """The leaf of a ``(groups, K)`` entry table (float32 holding the entries) and C-order indices."""
  k = book.shape[1]
  if k > MAX_CODEBOOK:
    where = "per leaf" if axis is None else f"per group of axis={axis}"
    raise ValueError(f"params leaf {path!r} would need {k} codebook entries {where}; at most {MAX_CODEBOOK} "
                     "fit 8-bit indices. Pass a mixture with fewer components, a finer axis= (one codebook "
                     "per group), or use cluster_weights.")
  bits = index_bits(k)
  if axis is None:
    book = book.reshape(k)
    scale = None if scale is None else scale.reshape(())
  stored = jnp.asarray(book.astype(jnp.dtype(codebook_dtype)))
  return QuantizedLeaf(stored, jnp.asarray(pack(idx, bits)), tuple(int(s) for s in shape), np.dtype(dtype).name,
                       bits, None, axis, None if scale is None else jnp.asarray(scale, jnp.float32))


def leaf_from_values(path: str, values: np.ndarray, shape: tuple[int, ...], dtype: Any, *,
                     axis: Axis = None, codebook_dtype: str = "float32") -> QuantizedLeaf:
  """The canonical leaf whose weights are ``values``: per group sorted distinct entries, all used.

  Values are first rounded to the leaf's dtype, then to the codebook dtype,
  so that dequantizing is exact and quantizing the result again gives the
  same leaf (for float32 codebooks; a narrower codebook rounds once more).
  """
  shape = tuple(int(s) for s in shape)
  axes = normalize_axis(shape, axis)
  v = to_rows_np(leaf_rounded(np.asarray(values).reshape(shape), dtype), axes)
  keys, scale = codebook_keys(v, codebook_dtype)
  book, _, inverse = _row_unique(keys)
  idx = from_rows_np(inverse, shape, axes)
  return leaf_from_entries(path, book, idx, scale, shape, dtype, axes, codebook_dtype)


def leaf_from_components(path: str, comp: np.ndarray, means: np.ndarray, shape: tuple[int, ...], dtype: Any, *,
                         axis: Axis = None, codebook_dtype: str = "float32") -> QuantizedLeaf:
  """The canonical leaf whose weight i is ``means[comp[i]]`` (``comp`` in C order), without a sort of the weights.

  Which components each group uses comes from one bincount; the entries are
  sorted per group over K components, not over the weights.
  """
  shape = tuple(int(s) for s in shape)
  axes = normalize_axis(shape, axis)
  k = int(np.size(means))
  groups = 1 if axes is None else math.prod(s for a, s in enumerate(shape) if a not in axes)
  if groups * k > 1 << 26:  # a (groups, K) table too large to be worth it: sort the weights instead
    return leaf_from_values(path, np.asarray(means)[comp], shape, dtype, axis=axes, codebook_dtype=codebook_dtype)
  comp = np.asarray(comp).ravel()
  code = comp if axes is None else group_ids(shape, axes).ravel().astype(np.int64) * k + comp
  used = np.bincount(code, minlength=groups * k).reshape(groups, k) > 0
  m = np.broadcast_to(leaf_rounded(means, dtype), (groups, k))
  keys, scale = codebook_keys(np.where(used, m, np.float32(0)), codebook_dtype)  # int8: peak over used only
  order = np.argsort(np.where(used, keys, np.inf), axis=1, kind="stable")  # used components first
  s, u = np.take_along_axis(keys, order, axis=1), np.take_along_axis(used, order, axis=1)
  new = u.copy()
  new[:, 1:] &= s[:, 1:] != s[:, :-1]
  rank = np.cumsum(new, axis=1) - 1
  counts = new.sum(axis=1)
  width = int(counts.max()) if groups and k else 0
  last = np.take_along_axis(s, np.maximum(counts - 1, 0)[:, None], axis=1) if k else np.zeros((groups, 1))
  book = np.repeat(last.astype(np.float32), width, axis=1)  # padding: each row's last entry
  rows = np.broadcast_to(np.arange(groups)[:, None], (groups, k))
  book[rows[new], rank[new]] = s[new]
  lut = np.empty((groups, k), np.int64)
  np.put_along_axis(lut, order, np.maximum(rank, 0), axis=1)
  idx = lut.reshape(-1)[code]
  return leaf_from_entries(path, book, idx, scale, shape, dtype, axes, codebook_dtype)
