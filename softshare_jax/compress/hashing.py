"""The hashing trick of HashedNets (Chen et al. 2015): shared values by position."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softshare_jax import checks
from softshare_jax.compress.quantized import index_bits
from softshare_jax.compress.quantized import pack
from softshare_jax.compress.quantized import Quantized
from softshare_jax.compress.quantized import QuantizedLeaf
from softshare_jax.compress.quantizer import host_weights
from softshare_jax.compress.quantizer import map_masked


def hash_positions(size: int, seed: int, num_buckets: int) -> np.ndarray:
  """Bucket of each position: MurmurHash3's 32-bit finalizer of (position, seed), mod num_buckets."""
  with np.errstate(over="ignore"):
    h = np.arange(size, dtype=np.uint32) * np.uint32(0x9E3779B1) ^ np.uint32(seed)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
  return (h % np.uint32(num_buckets)).astype(np.int64)


def hashed_leaf(codebook: np.ndarray, shape: tuple[int, ...], dtype: str, seed: int) -> QuantizedLeaf:
  size = math.prod(shape)
  bits = index_bits(codebook.size)
  idx = hash_positions(size, seed, codebook.size)
  return QuantizedLeaf(jnp.asarray(codebook, jnp.float32), jnp.asarray(pack(idx, bits)), tuple(shape),
                       dtype, bits, int(seed))


def hash_clusters(params: Any, num_buckets: int, *, key: jax.Array | None = None, mask: Any = None,
                  axis: Any = None) -> Quantized:
  """The hashing trick of HashedNets (Chen et al. 2015): shared values by position.

  Weight i of a masked tensor belongs to bucket h(i) ∈ [0, num_buckets), a
  hash (MurmurHash3's finalizer) of its flat position and a per-tensor seed
  drawn from ``key``; each bucket's value is the mean of its weights (the
  least-squares shared value; 0 for an empty bucket). To train a hashed
  network with ordinary layers, start from ``dequantize(q)`` and put
  ``keep_clusters(q, reduce="sum")`` before the optimizer: the buckets' shared
  values then get the gradient of a truly shared parameter. The indices are a
  function of the seed, so :func:`save_quantized` stores only the buckets and
  the seed, and :func:`compression_report` counts only those.

  Args:
    params: a pytree of arrays.
    num_buckets: >= 1, buckets per tensor.
    key: a PRNG key (required).
    mask: which leaves (default: float leaves with ndim >= 2).
    axis: must be None: a bucket is a hash of the flat position, shared by
      the whole tensor (HashedNets), so there is no per-group codebook.

  Returns:
    A :class:`Quantized` whose leaves have ``hash_seed`` set.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> q = ss.hash_clusters({"w": jnp.ones((8, 8))}, 4, key=jax.random.key(0))
    >>> q.tree["w"].codebook.shape, ss.dequantize(q)["w"].sum()
    ((4,), Array(64., dtype=float32))
  """
  if axis is not None:
    raise ValueError(f"hash_clusters: axis must be None, got {axis!r}; a hashed tensor's buckets are shared by "
                     "the whole tensor. For one codebook per group use quantize or cluster_weights with axis=.")
  checks.check_int("num_buckets", num_buckets, high=2**31 - 1)
  key = checks.require_key("hash_clusters", key)

  def one(i, path, leaf):
    w = host_weights(path, leaf).ravel()
    seed = int(jax.random.bits(jax.random.fold_in(key, i), dtype=jnp.uint32))
    idx = hash_positions(w.size, seed, num_buckets)
    counts = np.bincount(idx, minlength=num_buckets)
    means = np.bincount(idx, weights=w, minlength=num_buckets) / np.maximum(counts, 1)
    dtype = np.dtype(leaf.dtype)
    book = means.astype(dtype).astype(np.float32) + np.float32(0)
    return hashed_leaf(book, tuple(np.shape(leaf)), dtype.name, seed)

  return map_masked("hash_clusters", params, mask, one)
