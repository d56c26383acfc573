"""Compression: codebooks and indices, an honest size report, export, fine-tuning.

A trained network becomes a :class:`Quantized` pytree: every masked leaf is a
float32 codebook plus one packed index per weight (2 bits per index when the
codebook has <= 4 entries, 4 bits when <= 16, else 8; hashing may need 16 or
32), and every other leaf is kept as it is. Three ways to get there:

* :func:`quantize` — from the learned mixture of ``mixture_prior`` (Ullrich,
  Meeds & Welling 2017, §4.3): each weight takes the mean of its most
  responsible (``"map"``) or most likely (``"ml"``) component, so weights of
  the zero component become exact zeros. Without a mixture, a leaf's distinct
  values are its codebook (lossless packing of already-shared weights).
* :func:`cluster_weights` — the post-training baseline: per-tensor k-means
  (TensorFlow Model Optimization's clustering, Core ML's palettization),
  optionally after magnitude pruning.
* :func:`hash_clusters` — HashedNets (Chen et al. 2015): a weight's bucket is
  a hash of its position, so an export stores only the buckets and the seed.

:func:`compression_report` counts the bits the way Deep Compression (Han et
al. 2016) does; :func:`save_quantized` / :func:`load_quantized` write and read
a safetensors file with JSON metadata (never pickle); :func:`keep_clusters`
fine-tunes without losing the sharing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import json
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softshare_jax import _files
from softshare_jax import masks
from softshare_jax import mixture as mixture_lib

_FORMAT = "softshare_jax.quantized"
_FORMAT_VERSION = 1
_METADATA_KEY = "softshare_jax"
_MAX_CODEBOOK = 256  # quantize and cluster_weights store uint8 indices at most.
_ASSIGNMENTS = ("map", "ml")
_CLUSTER_INITS = ("kmeans++", "linear")
_REDUCTIONS = ("mean", "sum")
_CHUNK = 1 << 16  # weights per block when assigning components (memory O(chunk × K))
_LLOYD_MAX_ITERATIONS = 300
_SEEDING_SAMPLE = 1 << 14  # weights drawn (with replacement) for the k-means++ seeding
_HUFFMAN_LENGTH_BITS = 8  # a canonical Huffman table sends one code length per symbol


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
    return _unpack(jnp.asarray(self.indices), self.bits, self.size)

  def values(self) -> jax.Array:
    """The dequantized tensor: codebook values, in ``shape`` and ``dtype``."""
    book = jnp.asarray(self.codebook, jnp.float32)
    return book[self.unpacked()].reshape(self.shape).astype(jnp.dtype(self.dtype))


def _is_qleaf(x: Any) -> bool:
  return isinstance(x, QuantizedLeaf)


def _is_qleaf_or_none(x: Any) -> bool:
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
    """``(path, leaf)`` pairs, a :class:`QuantizedLeaf` counted as one leaf."""
    flat, _ = jax.tree_util.tree_flatten_with_path(self.tree, is_leaf=_is_qleaf)
    return [(masks.path_str(p), leaf) for p, leaf in flat]


# ----------------------------------------------------------------------------
# Index packing.


def _index_bits(num_entries: int) -> int:
  for bits in (2, 4, 8, 16):
    if num_entries <= 1 << bits:
      return bits
  return 32


def _pack(idx: np.ndarray, bits: int) -> np.ndarray:
  idx = np.asarray(idx).ravel()
  if bits >= 8:
    return idx.astype(np.dtype(f"uint{bits}"))
  per = 8 // bits
  padded = np.zeros(-(-idx.size // per) * per, np.uint16)
  padded[: idx.size] = idx
  shifted = padded.reshape(-1, per) << (np.arange(per, dtype=np.uint16) * bits)
  return np.bitwise_or.reduce(shifted, axis=1).astype(np.uint8)


def _unpack(packed: jax.Array, bits: int, size: int) -> jax.Array:
  if bits >= 8:
    return packed.reshape(-1)[:size].astype(jnp.int32)
  per = 8 // bits
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  fields = (packed.reshape(-1)[:, None] >> shifts[None, :]) & jnp.uint8((1 << bits) - 1)
  return fields.reshape(-1)[:size].astype(jnp.int32)


# ----------------------------------------------------------------------------
# Building leaves.


def _host_weights(path: str, leaf: Any) -> np.ndarray:
  if not masks.is_float_leaf(leaf):
    raise ValueError(f"params leaf {path!r} is not a floating-point array (dtype "
                     f"{getattr(leaf, 'dtype', type(leaf).__name__)}); leave it out with mask.")
  w = np.asarray(jax.device_get(leaf)).astype(np.float64)
  if not np.all(np.isfinite(w)):
    raise ValueError(f"params leaf {path!r} has non-finite values (NaN or Inf); cannot quantize it.")
  return w


def _leaf_from_values(path: str, values: np.ndarray, shape: tuple[int, ...], dtype: Any) -> QuantizedLeaf:
  """The canonical leaf whose weights are ``values``: sorted distinct codebook, all entries used.

  Values are first rounded to the leaf's dtype, so that dequantizing is exact
  and quantizing the result again gives the same leaf.
  """
  dtype = np.dtype(dtype)
  v = np.asarray(values, np.float64).ravel().astype(dtype).astype(np.float32) + np.float32(0)  # -0 → +0
  codebook, idx = np.unique(v, return_inverse=True)
  if codebook.size > _MAX_CODEBOOK:
    raise ValueError(f"params leaf {path!r} would need {codebook.size} codebook entries; at most "
                     f"{_MAX_CODEBOOK} fit 8-bit indices. Pass a mixture with fewer components, "
                     "or use cluster_weights.")
  bits = _index_bits(codebook.size)
  return QuantizedLeaf(jnp.asarray(codebook, jnp.float32), jnp.asarray(_pack(idx, bits)),
                       tuple(int(s) for s in shape), dtype.name, bits)


def _map_masked(name: str, params: Any, mask: Any, fn) -> Quantized:
  """Applies ``fn(i, path, leaf) -> QuantizedLeaf`` to the masked leaves (i counts them)."""
  keep = masks.resolve_mask(mask, params, masks.is_kernel_leaf)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  on = jax.tree_util.tree_leaves(keep)
  out, count = [], 0
  for (path, leaf), selected in zip(flat, on):
    if selected:
      out.append(fn(count, masks.path_str(path), leaf))
      count += 1
    else:
      out.append(leaf)
  if count == 0:
    raise ValueError(f"{name}: mask selects no leaf of params (the default selects float leaves "
                     "with ndim >= 2); pass mask=.")
  return Quantized(jax.tree_util.tree_unflatten(treedef, out))


def _check_key(name: str, key: Any) -> jax.Array:
  if key is None:
    raise ValueError(f"{name}: key is required (a jax.random key, e.g. jax.random.key(0)).")
  return key


# ----------------------------------------------------------------------------
# quantize / dequantize.


def _component_of(w: np.ndarray, mix: tuple[np.ndarray, np.ndarray, np.ndarray], use_weights: bool) -> np.ndarray:
  """argmax_j [log π_j] + log N(w | μ_j, 1/λ_j), float64, ``_CHUNK`` weights at a time."""
  mu, gamma, log_pi = mix
  lam = np.exp(gamma)
  base = 0.5 * gamma + (log_pi if use_weights else 0.0)
  out = np.empty(w.size, np.int64)
  flat = w.ravel()
  for s in range(0, flat.size, _CHUNK):
    x = flat[s:s + _CHUNK, None]
    out[s:s + _CHUNK] = np.argmax(base - 0.5 * lam * np.square(x - mu), axis=1)
  return out


def quantize(params: Any, mixture: mixture_lib.Mixture | None, *, mask: Any = None,
             assignment: str = "map") -> Quantized:
  """Replaces each masked weight by a shared value: codebook + packed indices.

  With a mixture (Ullrich et al. 2017, §4.3), weight w gets the mean of
  component

      "map":  argmax_j  π_j N(w | μ_j, σ_j²)   (most responsible)
      "ml":   argmax_j      N(w | μ_j, σ_j²)   (most likely)

  so weights of the zero component (μ_0 = 0) become exact zeros. Usually
  preceded by :func:`~softshare_jax.merge_components`. Each leaf keeps its own
  codebook: the means its weights use, rounded to the leaf's dtype, sorted and
  distinct (components no weight of the leaf uses are dropped). With
  ``mixture=None`` a leaf's distinct values are its codebook: lossless packing
  of weights that already share values (at most 256 per leaf).

  ``quantize(dequantize(q), None)`` gives back ``q``; so does
  ``quantize(dequantize(q), mixture)`` whenever every used mean is assigned to
  its own component (true unless a component is hidden under another).

  Runs on the host (float64), not under ``jit``.

  Args:
    params: a pytree of arrays.
    mixture: a :class:`~softshare_jax.Mixture` (e.g. ``ss.get_mixture(state)``)
      or None.
    mask: which leaves to quantize (pytree of bools or callable; default:
      float leaves with ndim >= 2, as ``mixture_prior``).
    assignment: ``"map"`` or ``"ml"``.

  Returns:
    A :class:`Quantized`.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> m = ss.Mixture(free_means=jnp.array([-0.5, 0.5]), log_precisions=jnp.full(3, 4.0),
    ...                logits=jnp.zeros(2), zero_logit=jnp.array(0.0))
    >>> q = ss.quantize({"w": jnp.array([[-0.4, 0.05], [0.6, -0.02]])}, m)
    >>> q.tree["w"].codebook, ss.dequantize(q)["w"]
    (Array([-0.5,  0. ,  0.5], dtype=float32), Array([[-0.5,  0. ], [ 0.5,  0. ]], dtype=float32))
  """
  if assignment not in _ASSIGNMENTS:
    raise ValueError(f"assignment must be one of {_ASSIGNMENTS}, got {assignment!r}.")
  mix = None
  if mixture is not None:
    mixture_lib._check_mixture(mixture)  # noqa: SLF001 - one check for the package.
    mix = tuple(np.asarray(jax.device_get(a), np.float64)
                for a in (mixture.means, mixture.log_precisions, mixture.log_weights))

  def one(_, path, leaf):
    w = _host_weights(path, leaf)
    values = w if mix is None else mix[0][_component_of(w, mix, assignment == "map")]
    return _leaf_from_values(path, values, w.shape, leaf.dtype)

  return _map_masked("quantize", params, mask, one)


def dequantize(quantized: Quantized) -> Any:
  """The params tree back: every quantized leaf is its codebook values (traceable).

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> q = ss.quantize({"w": jnp.array([[0.25, -1.0], [0.25, 0.25]])}, None)
    >>> ss.dequantize(q)["w"]
    Array([[ 0.25, -1.  ], [ 0.25,  0.25]], dtype=float32)
  """
  if not isinstance(quantized, Quantized):
    raise ValueError(f"quantized must be a Quantized, got {type(quantized).__name__}.")
  return jax.tree.map(lambda x: x.values() if _is_qleaf(x) else x, quantized.tree, is_leaf=_is_qleaf)


# ----------------------------------------------------------------------------
# The k-means baseline and the hashing trick.


_kmeans_pp = jax.jit(mixture_lib._kmeans_pp, static_argnums=1)  # noqa: SLF001 - one k-means++ seeding.


def _lloyd_1d(x_sorted: np.ndarray, centres: np.ndarray) -> np.ndarray:
  """Lloyd's iterations in 1-D to a fixed point (float64): nearest centre by midpoints."""
  c = np.sort(np.asarray(centres, np.float64))
  k = c.size
  for _ in range(_LLOYD_MAX_ITERATIONS):
    a = np.searchsorted((c[1:] + c[:-1]) / 2, x_sorted)
    counts = np.bincount(a, minlength=k)
    sums = np.bincount(a, weights=x_sorted, minlength=k)
    new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), c))
    if np.array_equal(new, c):
      break
    c = new
  return c


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
  c = np.sort(centres)
  return c[np.searchsorted((c[1:] + c[:-1]) / 2, x)]


def cluster_weights(params: Any, num_clusters: int, *, mask: Any = None, key: jax.Array | None = None,
                    init: str = "kmeans++", prune_fraction: float = 0.0) -> Quantized:
  """Post-training weight clustering: per-tensor 1-D k-means (the usual baseline).

  What TensorFlow Model Optimization's ``cluster_weights`` and Core ML's
  palettization do: each masked tensor gets its own ``num_clusters`` shared
  values, the k-means centroids of its weights, and every weight takes its
  nearest centroid. With ``prune_fraction > 0`` the smallest-magnitude
  fraction of each tensor is first set to zero (magnitude pruning, Han et al.)
  and stays out of the clustering; zero then counts as one of the
  ``num_clusters`` codebook entries, so k-means fits ``num_clusters − 1``
  centroids to the survivors and the index width is the same with or without
  pruning.

  Initialization: ``"kmeans++"`` (seeded with ``key`` on a sample of 2^14
  weights drawn with replacement) or ``"linear"`` (evenly spaced over
  [min, max], Han et al.'s choice). Lloyd's iterations then run on all the
  weights to a fixed point in float64 on the host.

  Args:
    params: a pytree of arrays.
    num_clusters: codebook entries per tensor, 1..256 (2..256 with pruning).
    mask: which leaves (default: float leaves with ndim >= 2).
    key: a PRNG key (required by ``"kmeans++"``).
    init: ``"kmeans++"`` or ``"linear"``.
    prune_fraction: in [0, 1): the fraction of each tensor pruned first.

  Returns:
    A :class:`Quantized`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> w = jnp.array([[-1.02, -0.98, 0.01], [1.0, 0.99, -0.02]])
    >>> q = ss.cluster_weights({"w": w}, 3, key=jax.random.key(0))
    >>> q.tree["w"].codebook.tolist()  # doctest: +NUMBER
    [-1.00, -0.005, 0.995]
  """
  if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) \
      or not 1 <= num_clusters <= _MAX_CODEBOOK:
    raise ValueError(f"num_clusters must be an int in [1, {_MAX_CODEBOOK}], got {num_clusters!r}.")
  if init not in _CLUSTER_INITS:
    raise ValueError(f"init must be one of {_CLUSTER_INITS}, got {init!r}.")
  if not 0.0 <= float(prune_fraction) < 1.0:
    raise ValueError(f"prune_fraction must be in [0, 1), got {prune_fraction!r}.")
  if prune_fraction > 0 and num_clusters < 2:
    raise ValueError("num_clusters must be >= 2 with prune_fraction > 0 (zero is one of the entries).")
  if init == "kmeans++":
    key = _check_key("cluster_weights", key)

  def one(i, path, leaf):
    w = _host_weights(path, leaf).ravel()
    pruned = np.zeros(w.size, bool)
    n_pruned = int(round(float(prune_fraction) * w.size))
    if n_pruned:
      pruned[np.argsort(np.abs(w), kind="stable")[:n_pruned]] = True
    k = num_clusters - (1 if n_pruned else 0)
    x = np.sort(w[~pruned])
    values = np.zeros_like(w)
    if x.size:
      distinct = np.unique(x)
      if distinct.size <= k:
        centres = distinct
      elif init == "linear":
        centres = _lloyd_1d(x, np.linspace(x[0], x[-1], k))
      else:
        # Seeded on a fixed-size sample, so the jitted seeding compiles once per k, not per tensor.
        leaf_key = jax.random.fold_in(key, i)
        pick = np.asarray(jax.random.randint(leaf_key, (_SEEDING_SAMPLE,), 0, x.size))
        seeds = _kmeans_pp(jnp.asarray(x[pick], jnp.float32), k, leaf_key)
        centres = _lloyd_1d(x, np.asarray(seeds, np.float64))
      values[~pruned] = _nearest(w[~pruned], centres)
    return _leaf_from_values(path, values, np.shape(leaf), leaf.dtype)

  return _map_masked("cluster_weights", params, mask, one)


def _hash_positions(size: int, seed: int, num_buckets: int) -> np.ndarray:
  """Bucket of each position: MurmurHash3's 32-bit finalizer of (position, seed), mod num_buckets."""
  with np.errstate(over="ignore"):
    h = np.arange(size, dtype=np.uint32) * np.uint32(0x9E3779B1) ^ np.uint32(seed)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
  return (h % np.uint32(num_buckets)).astype(np.int64)


def _hashed_leaf(codebook: np.ndarray, shape: tuple[int, ...], dtype: str, seed: int) -> QuantizedLeaf:
  size = math.prod(shape)
  bits = _index_bits(codebook.size)
  idx = _hash_positions(size, seed, codebook.size)
  return QuantizedLeaf(jnp.asarray(codebook, jnp.float32), jnp.asarray(_pack(idx, bits)), tuple(shape),
                       dtype, bits, int(seed))


def hash_clusters(params: Any, num_buckets: int, *, key: jax.Array | None = None, mask: Any = None) -> Quantized:
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

  Returns:
    A :class:`Quantized` whose leaves have ``hash_seed`` set.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> q = ss.hash_clusters({"w": jnp.ones((8, 8))}, 4, key=jax.random.key(0))
    >>> q.tree["w"].codebook.shape, ss.dequantize(q)["w"].sum()
    ((4,), Array(64., dtype=float32))
  """
  if isinstance(num_buckets, bool) or not isinstance(num_buckets, (int, np.integer)) or num_buckets < 1 \
      or num_buckets > 2**31 - 1:
    raise ValueError(f"num_buckets must be an int >= 1, got {num_buckets!r}.")
  key = _check_key("hash_clusters", key)

  def one(i, path, leaf):
    w = _host_weights(path, leaf).ravel()
    seed = int(jax.random.bits(jax.random.fold_in(key, i), dtype=jnp.uint32))
    idx = _hash_positions(w.size, seed, num_buckets)
    counts = np.bincount(idx, minlength=num_buckets)
    means = np.bincount(idx, weights=w, minlength=num_buckets) / np.maximum(counts, 1)
    dtype = np.dtype(leaf.dtype)
    book = means.astype(dtype).astype(np.float32) + np.float32(0)
    return _hashed_leaf(book, tuple(np.shape(leaf)), dtype.name, seed)

  return _map_masked("hash_clusters", params, mask, one)


# ----------------------------------------------------------------------------
# Fine-tuning with the clusters kept.


class KeepClustersState(NamedTuple):
  """State of :func:`keep_clusters`.

  Attributes:
    clusters: the quantized leaves (codebooks and packed indices), None elsewhere.
    scales: per quantized leaf, ``(K,)`` factors applied to each cluster's summed
      update: 1/|c| ("mean") or 1 ("sum"), and 0 for the zero cluster.
  """

  clusters: Any
  scales: Any


def keep_clusters(quantized: Quantized, *, reduce: str = "mean") -> optax.GradientTransformation:
  """Fine-tuning after quantization: one update per cluster, zeros kept at zero.

  For each quantized leaf, weight i in cluster c(i) gets

      u_i ← A_c(i),   A_c = 1/|c| Σ_{j∈c} u_j  ("mean")  or  Σ_{j∈c} u_j  ("sum")

  and A_c = 0 for the cluster whose codebook value is exactly 0 (pruned
  weights). ``"sum"`` is the gradient of one truly shared value (what
  Deep Compression's centroid fine-tuning and HashedNets train). Place it
  BEFORE the optimizer, starting from ``dequantize(quantized)``:
  ``optax.chain(ss.keep_clusters(q), optax.adam(1e-4))``. Every weight of a
  cluster then sees the same gradient, so any optimizer that treats elements
  alike (SGD, momentum, Adam, ...) keeps them equal, and zeros get zero
  gradients and stay zero. Leaves that were not quantized pass through.

  Args:
    quantized: a :class:`Quantized` (from :func:`quantize`,
      :func:`cluster_weights` or :func:`hash_clusters`).
    reduce: ``"mean"`` (default) or ``"sum"``.

  Returns:
    An ``optax.GradientTransformation`` whose state holds the packed indices
    (2–8 bits per weight).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import softshare_jax as ss
    >>> q = ss.quantize({"w": jnp.array([[0.5, 0.0], [0.5, 0.5]])}, None)
    >>> tx = optax.chain(ss.keep_clusters(q), optax.sgd(1.0))
    >>> params = ss.dequantize(q)
    >>> updates, _ = tx.update({"w": jnp.array([[1.0, 9.0], [2.0, 3.0]])}, tx.init(params))
    >>> updates["w"]
    Array([[-2., -0.], [-2., -2.]], dtype=float32)
  """
  if not isinstance(quantized, Quantized):
    raise ValueError(f"quantized must be a Quantized, got {type(quantized).__name__}.")
  if reduce not in _REDUCTIONS:
    raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}.")
  clusters = jax.tree.map(lambda x: x if _is_qleaf(x) else None, quantized.tree, is_leaf=_is_qleaf)

  def aligned(tree, state_clusters, what):
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: x is None)
    flat, _ = jax.tree_util.tree_flatten_with_path(state_clusters, is_leaf=_is_qleaf_or_none)
    if len(leaves) != len(flat):
      raise ValueError(f"keep_clusters: the {what} have {len(leaves)} leaves, the quantized tree "
                       f"{len(flat)}; build the params with ss.dequantize(quantized).")
    for (path, q), leaf in zip(flat, leaves):
      if _is_qleaf(q) and leaf is not None and tuple(np.shape(leaf)) != q.shape:
        raise ValueError(f"keep_clusters: {what} leaf {masks.path_str(path)!r} has shape "
                         f"{tuple(np.shape(leaf))}, its quantized leaf {q.shape}.")
    return leaves, [q for _, q in flat]

  def scale(q):
    if q is None:
      return None
    k = q.codebook.shape[0]
    factor = jnp.ones((k,), jnp.float32)
    if reduce == "mean":
      factor = factor / jnp.maximum(jax.ops.segment_sum(jnp.ones((q.size,), jnp.float32), q.unpacked(), k), 1.0)
    return jnp.where(jnp.asarray(q.codebook) == 0, 0.0, factor)

  def init_fn(params):
    aligned(params, clusters, "params")
    return KeepClustersState(clusters, jax.tree.map(scale, clusters, is_leaf=_is_qleaf_or_none))

  def update_fn(updates, state, params=None):
    del params
    leaves, qleaves = aligned(updates, state.clusters, "updates")
    scales = jax.tree.leaves(state.scales, is_leaf=lambda x: x is None)
    out = []
    for u, q, factor in zip(leaves, qleaves, scales):
      if u is None or q is None:
        out.append(u)
        continue
      idx = q.unpacked()
      sums = jax.ops.segment_sum(u.reshape(-1).astype(jnp.float32), idx, q.codebook.shape[0])
      out.append((sums * factor)[idx].reshape(u.shape).astype(u.dtype))
    treedef = jax.tree.structure(updates, is_leaf=lambda x: x is None)
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------
# The compression report.


@dataclasses.dataclass(frozen=True)
class LeafReport:
  """The size of one leaf (or of the total) under each storage scheme, in bits.

  Attributes:
    path: the leaf's path ("total" for the sum).
    kind: ``"dense"`` or ``"conv"`` (quantized, CSR with 5- or 8-bit relative
      indices), ``"hashed"``, or ``"kept"`` (not quantized).
    weights: number of weights.
    nonzeros: weights that are not exactly 0.
    codebook: K, codebook entries (0 for kept leaves).
    fillers: filler zeros the CSR format needs.
    csr_bits: Deep Compression's CSR with fixed-width indices.
    huffman_bits: the same with Huffman-coded indices (tables included).
    packed_bits: what :func:`save_quantized` stores: the packed indices and
      the codebook (no header).
    dense_bits: the float32 baseline, 32 per weight.
  """

  path: str
  kind: str
  weights: int
  nonzeros: int
  codebook: int
  fillers: int
  csr_bits: int
  huffman_bits: int
  packed_bits: int
  dense_bits: int

  @property
  def ratio(self) -> float:
    """Compression ratio of the CSR format against dense float32."""
    return self.dense_bits / max(self.csr_bits, 1)

  @property
  def ratio_huffman(self) -> float:
    return self.dense_bits / max(self.huffman_bits, 1)

  @property
  def ratio_packed(self) -> float:
    return self.dense_bits / max(self.packed_bits, 1)

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "ratio": self.ratio, "ratio_huffman": self.ratio_huffman,
            "ratio_packed": self.ratio_packed}


@dataclasses.dataclass(frozen=True)
class CompressionReport:
  """Per-leaf :class:`LeafReport` rows and their total; ``str()`` is a table.

  ``file_bytes`` is the size of the file that :func:`save_quantized` wrote, when
  the report was made with ``path=``.
  """

  leaves: tuple[LeafReport, ...]
  total: LeafReport
  file_bytes: int | None = None

  @property
  def ratio(self) -> float:
    return self.total.ratio

  @property
  def file_ratio(self) -> float | None:
    """Dense float32 bytes over the file's bytes."""
    return None if not self.file_bytes else self.total.dense_bits / 8 / self.file_bytes

  def to_dict(self) -> dict:
    return {"leaves": [r.to_dict() for r in self.leaves], "total": self.total.to_dict(),
            "file_bytes": self.file_bytes, "file_ratio": self.file_ratio}

  def __str__(self) -> str:
    headers = ("leaf", "kind", "weights", "non-zero", "K", "fillers", "CSR bits", "ratio",
               "Huffman", "packed")
    rows = [(r.path, r.kind, r.weights, r.nonzeros, r.codebook, r.fillers, r.csr_bits,
             f"{r.ratio:.1f}x", f"{r.ratio_huffman:.1f}x", f"{r.ratio_packed:.1f}x")
            for r in (*self.leaves, self.total)]
    cells = [headers] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
      return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
    lines[-1:-1] = ["  ".join("-" * w for w in widths)]
    if self.file_bytes is not None:
      lines.append(f"file: {self.file_bytes} bytes, {self.file_ratio:.1f}x smaller than "
                   f"{self.total.dense_bits // 8} bytes of float32")
    return "\n".join(lines)


def _huffman_bits(counts: np.ndarray) -> int:
  """Bits of a Huffman code for symbols with these counts (the sum of the merge weights)."""
  heap = [int(c) for c in np.asarray(counts).ravel() if c > 0]
  if len(heap) <= 1:
    return sum(heap)  # one symbol: one bit each
  heapq.heapify(heap)
  total = 0
  while len(heap) > 1:
    merged = heapq.heappop(heap) + heapq.heappop(heap)
    total += merged
    heapq.heappush(heap, merged)
  return total


def _csr_rows(shape: tuple[int, ...]) -> tuple[int, int]:
  """(rows, row length): one row per output unit, the LAST axis (Flax's kernels are (..., in, out))."""
  if len(shape) < 2:
    return 1, math.prod(shape)
  return shape[-1], math.prod(shape[:-1])


def _quantized_report(path: str, q: QuantizedLeaf) -> LeafReport:
  book = np.asarray(q.codebook, np.float32)
  k = int(book.size)
  idx = np.asarray(q.unpacked()).reshape(q.shape)
  codebook_bits = 32 * k
  nonzeros = int(np.count_nonzero(book[idx]))
  dense_bits = 32 * q.size
  if q.hash_seed is not None:
    bits = codebook_bits + 32  # the buckets and the seed; the indices are recomputed.
    return LeafReport(path, "hashed", q.size, nonzeros, k, 0, bits, bits, bits, dense_bits)
  kind = "conv" if len(q.shape) >= 3 else "dense"
  rel_bits = 8 if kind == "conv" else 5
  span = 1 << rel_bits
  rows, length = _csr_rows(q.shape)
  by_row = np.moveaxis(idx.reshape(q.shape or (1,)), -1, 0).reshape(rows, length)
  r, c = np.nonzero(book[by_row] != 0)  # row-major: sorted by row, then column
  prev = np.where(np.r_[True, r[1:] != r[:-1]], -1, np.r_[-1, c[:-1]]) if r.size else c
  gaps = c - prev  # >= 1; the first non-zero of a row counts from column −1
  fillers_each = (gaps - 1) // span
  fillers = int(fillers_each.sum())
  entries = nonzeros + fillers
  index_bits = math.ceil(math.log2(k)) if k > 1 else 0
  pointer_bits = (rows + 1) * max(1, math.ceil(math.log2(entries + 1)))
  csr = entries * (rel_bits + index_bits) + codebook_bits + pointer_bits
  # Huffman: a filler is the symbol "span" (the largest gap) with the zero entry's index.
  rel_counts = np.bincount(gaps - fillers_each * span, minlength=span + 1)
  rel_counts[span] += fillers
  book_counts = np.bincount(by_row[r, c], minlength=k)
  if fillers:
    book_counts[int(np.flatnonzero(book == 0)[0])] += fillers
  tables = _HUFFMAN_LENGTH_BITS * (span + k)
  huffman = (_huffman_bits(rel_counts) + _huffman_bits(book_counts) + tables + codebook_bits
             + pointer_bits)
  packed = 8 * int(np.asarray(q.indices).nbytes) + codebook_bits
  return LeafReport(path, kind, q.size, nonzeros, k, fillers, csr, huffman, packed, dense_bits)


def compression_report(quantized: Quantized, *, path: str | os.PathLike | None = None) -> CompressionReport:
  """The storage a :class:`Quantized` needs, counted as Deep Compression does.

  Accounting, per quantized leaf (Han et al. 2016; Ullrich et al. 2017):

  * Layout: the leaf is a matrix with one row per output unit (its LAST axis,
    Flax's ``(..., in, out)``) and the other axes flattened in C order as the
    columns. Only non-zero weights are stored (CSR).
  * Relative column indices: 5 bits for dense leaves (ndim <= 2), 8 bits for
    convolution kernels (ndim >= 3). An entry's gap to the previous stored
    entry of its row (from column −1 at the row start) is 1..2^bits; a larger
    gap first stores ⌈gap / 2^bits⌉ − 1 filler zeros, each a full entry.
  * Codebook indices: ⌈log2 K⌉ bits per stored entry (fillers included), K
    the leaf's codebook size counting the zero entry.
  * Codebook: 32 bits per entry.
  * Row pointers: rows + 1 of them, each ⌈log2(E + 1)⌉ bits, E the stored
    entries (the narrowest fixed width that can hold them).
  * Huffman variant: both index streams Huffman-coded (optimal code lengths
    from the leaf's own counts), plus a canonical code table of 8 bits per
    symbol of each alphabet (2^bits gaps and K indices).
  * Packed: the 2/4/8-bit indices of the file, plus the codebook.
  * Hashed leaves: the buckets (32 bits each) and a 32-bit seed.
  * Leaves that were not quantized: their own dtype's bits per value in every
    scheme (biases stay float32).

  The baseline is 32 bits per value of every leaf, so the totals' ratio is
  the whole model's compression, kept leaves included.

  Args:
    quantized: a :class:`Quantized`.
    path: optional: a file written by :func:`save_quantized`, whose size the
      report shows.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> w = jnp.zeros((40, 2)).at[0, 0].set(1.0).at[39, 0].set(1.0)
    >>> r = ss.compression_report(ss.quantize({"w": w}, None)).leaves[0]
    >>> r.nonzeros, r.fillers, r.csr_bits
    (2, 1, 88)
  """
  if not isinstance(quantized, Quantized):
    raise ValueError(f"quantized must be a Quantized, got {type(quantized).__name__}.")
  rows = []
  for leaf_path, leaf in quantized.leaves_with_paths():
    if _is_qleaf(leaf):
      rows.append(_quantized_report(leaf_path, leaf))
    else:
      a = np.asarray(jax.device_get(leaf))
      bits = a.size * a.dtype.itemsize * 8
      rows.append(LeafReport(leaf_path, "kept", a.size, int(np.count_nonzero(a)), 0, 0, bits, bits, bits,
                             32 * a.size))
  sums = [sum(getattr(r, f.name) for r in rows) for f in dataclasses.fields(LeafReport)[2:]]
  total = LeafReport("total", "", *sums)
  file_bytes = None if path is None else os.path.getsize(path)
  return CompressionReport(tuple(rows), total, file_bytes)


# ----------------------------------------------------------------------------
# Files: safetensors with JSON metadata; never pickle.


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
  from safetensors.numpy import save  # A dev dependency: needed only to export.

  if not isinstance(quantized, Quantized):
    raise ValueError(f"quantized must be a Quantized, got {type(quantized).__name__}.")
  flat, _ = jax.tree_util.tree_flatten_with_path(quantized.tree, is_leaf=_is_qleaf)
  tensors, entries = {}, []
  for i, (keys, leaf) in enumerate(flat):
    names = [masks.path_str((k,)) for k in keys]
    if _is_qleaf(leaf):
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
  _files.write_bytes_atomic(path, save(tensors, metadata={_METADATA_KEY: json.dumps(info)}))


def _bad_file(path: Any, why: str) -> ValueError:
  return ValueError(f"{os.fspath(path)!s} is not a readable softshare_jax quantized file: {why}")


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
    return _hashed_leaf(book, shape, dtype.name, int(entry["hash_seed"]))
  bits = int(entry["bits"])
  packed = tensors[f"{i}/indices"]
  size = math.prod(shape)
  expected = size if bits >= 8 else -(-size // (8 // bits))
  if bits != _index_bits(book.size) or packed.dtype != np.dtype(f"uint{max(bits, 8)}") or packed.size != expected:
    raise _bad_file(path, f"leaf {i}'s indices ({packed.dtype}[{packed.size}]) do not fit {bits}-bit "
                    f"indices of {size} weights into a codebook of {book.size}.")
  leaf = QuantizedLeaf(jnp.asarray(book), jnp.asarray(packed), shape, dtype.name, bits)
  if size and int(jnp.max(leaf.unpacked())) >= book.size:
    raise _bad_file(path, f"leaf {i} has an index past its codebook of {book.size}.")
  return leaf


def load_quantized(path: str | os.PathLike, *, like: Any = None) -> Quantized:
  """Reads a file written by :func:`save_quantized`; checks it first.

  A truncated, corrupted (checksum) or foreign file raises a ValueError that
  says which; nothing is ever unpickled. The tree comes back as nested dicts
  keyed by the path's key names; pass ``like`` (the original params, or a
  :class:`Quantized`) to get its structure instead (Flax ``FrozenDict``,
  ``nnx.State``, lists...): its leaves' paths must match the file's.

  Example: see :func:`save_quantized`.
  """
  from safetensors.numpy import load  # A dev dependency: needed only to import a file.

  with open(path, "rb") as f:
    data = f.read()
  info = _read_info(path, data)
  try:
    tensors = load(data)
  except Exception as e:  # noqa: BLE001 - safetensors raises its own error types.
    raise _bad_file(path, f"its tensor data cannot be read ({e}); the file is truncated or corrupted.") from None
  if _digest(tensors) != info.get("sha256"):
    raise _bad_file(path, "its checksum does not match its tensors; the file is corrupted.")
  try:
    entries = info["leaves"]
    leaves = [_leaf_from_file(path, i, e, tensors) for i, e in enumerate(entries)]
    paths = [list(map(str, e["path"])) for e in entries]
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, ValueError) and "softshare_jax quantized file" in str(e):
      raise
    raise _bad_file(path, f"its metadata does not describe its tensors ({e!r}).") from None
  if like is not None:
    template = like.tree if isinstance(like, Quantized) else like
    flat, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=_is_qleaf)
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
