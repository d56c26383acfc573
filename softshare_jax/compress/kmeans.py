"""The post-training baseline: per-tensor 1-D k-means (TFMOT clustering, Core ML palettization)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softshare_jax import checks
from softshare_jax.compress.quantized import leaf_from_values
from softshare_jax.compress.quantized import MAX_CODEBOOK
from softshare_jax.compress.quantized import Quantized
from softshare_jax.compress.quantizer import host_weights
from softshare_jax.compress.quantizer import map_masked
from softshare_jax.mixture.init import kmeans_pp

_CLUSTER_INITS = ("kmeans++", "linear")
_LLOYD_MAX_ITERATIONS = 300
_SEEDING_SAMPLE = 1 << 14  # weights drawn (with replacement) for the k-means++ seeding
# Jitted once per k: the seeding runs on a fixed-size sample of every tensor.
_seed_centres = jax.jit(kmeans_pp, static_argnums=1)


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
  checks.check_int("num_clusters", num_clusters, high=MAX_CODEBOOK)
  checks.check_choice("init", init, _CLUSTER_INITS)
  if not 0.0 <= float(prune_fraction) < 1.0:
    raise ValueError(f"prune_fraction must be in [0, 1), got {prune_fraction!r}.")
  if prune_fraction > 0 and num_clusters < 2:
    raise ValueError("num_clusters must be >= 2 with prune_fraction > 0 (zero is one of the entries).")
  if init == "kmeans++":
    key = checks.require_key("cluster_weights", key)

  def one(i, path, leaf):
    w = host_weights(path, leaf).ravel()
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
        seeds = _seed_centres(jnp.asarray(x[pick], jnp.float32), k, leaf_key)
        centres = _lloyd_1d(x, np.asarray(seeds, np.float64))
      values[~pruned] = _nearest(w[~pruned], centres)
    return leaf_from_values(path, values, np.shape(leaf), leaf.dtype)

  return map_masked("cluster_weights", params, mask, one)
