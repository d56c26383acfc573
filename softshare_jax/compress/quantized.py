"""The compressed format: :class:`QuantizedLeaf`, :class:`Quantized`, index packing.

A quantized tensor is a float32 codebook plus one packed index per weight: 2
bits per index when the codebook has <= 4 entries, 4 bits when <= 16, else 8
(hashing may need 16 or 32). Every quantizer builds its leaves here, so a
leaf means the same thing whoever made it.
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

MAX_CODEBOOK = 256  # quantize and cluster_weights store uint8 indices at most.


# ----------------------------------------------------------------------------
# The pytree.


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codebook", "indices"],
    meta_fields=["shape", "dtype", "bits", "hash_seed"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedLeaf:
  """One quantized tensor: a codebook and one packed index per weight.

  Attributes:
    codebook: ``(K,)`` float32 shared values. From :func:`quantize` and
      :func:`cluster_weights` they are sorted, distinct and all in use; from
      :func:`hash_clusters` entry b is bucket b.
    indices: packed uint8 for ``bits`` of 2 or 4 (the first index in the
      lowest bits of a byte), else ``uint{bits}``, in C order of ``shape``.
    shape: the tensor's shape (static).
    dtype: the tensor's dtype name, e.g. ``"float32"``, ``"bfloat16"`` (static).
    bits: bits per index: 2, 4, 8, 16 or 32 (static).
    hash_seed: the hash seed for :func:`hash_clusters` leaves, else None
      (static). A hashed leaf's indices are a function of the seed, so an
      export stores only the codebook.
  """

  codebook: jax.Array
  indices: jax.Array
  shape: tuple[int, ...]
  dtype: str
  bits: int
  hash_seed: int | None = None

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def unpacked(self) -> jax.Array:
    """``(size,)`` int32 codebook indices (traceable)."""
    return unpack(jnp.asarray(self.indices), self.bits, self.size)

  def values(self) -> jax.Array:
    """The dequantized tensor: codebook values, in ``shape`` and ``dtype``."""
    book = jnp.asarray(self.codebook, jnp.float32)
    return book[self.unpacked()].reshape(self.shape).astype(jnp.dtype(self.dtype))


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
# Index packing.


def index_bits(num_entries: int) -> int:
  for bits in (2, 4, 8, 16):
    if num_entries <= 1 << bits:
      return bits
  return 32


def pack(idx: np.ndarray, bits: int) -> np.ndarray:
  idx = np.asarray(idx).ravel()
  if bits >= 8:
    return idx.astype(np.dtype(f"uint{bits}"))
  per = 8 // bits
  padded = np.zeros(-(-idx.size // per) * per, np.uint16)
  padded[: idx.size] = idx
  shifted = padded.reshape(-1, per) << (np.arange(per, dtype=np.uint16) * bits)
  return np.bitwise_or.reduce(shifted, axis=1).astype(np.uint8)


def unpack(packed: jax.Array, bits: int, size: int) -> jax.Array:
  if bits >= 8:
    return packed.reshape(-1)[:size].astype(jnp.int32)
  per = 8 // bits
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  fields = (packed.reshape(-1)[:, None] >> shifts[None, :]) & jnp.uint8((1 << bits) - 1)
  return fields.reshape(-1)[:size].astype(jnp.int32)


def leaf_from_values(path: str, values: np.ndarray, shape: tuple[int, ...], dtype: Any) -> QuantizedLeaf:
  """The canonical leaf whose weights are ``values``: sorted distinct codebook, all entries used.

  Values are first rounded to the leaf's dtype, so that dequantizing is exact
  and quantizing the result again gives the same leaf.
  """
  dtype = np.dtype(dtype)
  v = np.asarray(values, np.float64).ravel().astype(dtype).astype(np.float32) + np.float32(0)  # -0 → +0
  codebook, idx = np.unique(v, return_inverse=True)
  if codebook.size > MAX_CODEBOOK:
    raise ValueError(f"params leaf {path!r} would need {codebook.size} codebook entries; at most "
                     f"{MAX_CODEBOOK} fit 8-bit indices. Pass a mixture with fewer components, "
                     "or use cluster_weights.")
  bits = index_bits(codebook.size)
  return QuantizedLeaf(jnp.asarray(codebook, jnp.float32), jnp.asarray(pack(idx, bits)),
                       tuple(int(s) for s in shape), dtype.name, bits)
