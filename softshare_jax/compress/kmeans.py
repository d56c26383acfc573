"""The post-training baseline: per-tensor or per-group 1-D k-means (TFMOT clustering, Core ML palettization)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softshare_jax import checks
from softshare_jax.groups import Axis
from softshare_jax.compress.lloyd import lloyd_1d
from softshare_jax.compress.lloyd import nearest_centres
from softshare_jax.compress.lloyd import nearest_index
from softshare_jax.compress.quantized import check_codebook_dtype
from softshare_jax.compress.quantized import from_rows_np
from softshare_jax.compress.quantized import leaf_from_components
from softshare_jax.compress.quantized import leaf_from_values
from softshare_jax.compress.quantized import normalize_axis
from softshare_jax.compress.quantized import to_rows_np
from softshare_jax.compress.quantized import MAX_CODEBOOK
from softshare_jax.compress.quantized import Quantized
from softshare_jax.compress.quantizer import host_weights
from softshare_jax.compress.quantizer import map_masked
from softshare_jax.mixture.kmeanspp import kmeans_pp

_CLUSTER_INITS = ("kmeans++", "linear")
_SEEDING_SAMPLE = 1 << 14  # weights drawn (with replacement) for the k-means++ seeding
_SEEDING_BLOCK = 1 << 20  # groups x sample seeded in one vmapped call
# Jitted once per k: the seeding runs on a fixed-size sample of every tensor.
_seed_centres = jax.jit(kmeans_pp, static_argnums=1)
_seed_rows = jax.jit(jax.vmap(kmeans_pp, in_axes=(0, None, 0)), static_argnums=1)


def _seeds(x: np.ndarray, k: int, key: jax.Array) -> np.ndarray:
  """k-means++ seeds for each sorted row of ``x`` (groups, n), from a fixed-size sample of each row."""
  g, n = x.shape
  sample = min(_SEEDING_SAMPLE, 1 << max(0, (n - 1).bit_length()))  # a power of two: few compilations
  out = np.empty((g, k))
  step = max(1, _SEEDING_BLOCK // sample)
  for s in range(0, g, step):
    if g == 1:  # one group: the tensor's own key, as before groups existed
      keys = key[None]
    else:
      keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(s, min(g, s + step)))
    pick = np.asarray(jax.vmap(lambda kk: jax.random.randint(kk, (sample,), 0, n))(keys))
    rows = np.take_along_axis(x[s:s + step], pick, axis=1)
    if g == 1 and sample == _SEEDING_SAMPLE:
      out[s:s + step] = np.asarray(_seed_centres(jnp.asarray(rows[0], jnp.float32), k, keys[0]))
    else:
      out[s:s + step] = np.asarray(_seed_rows(jnp.asarray(rows, jnp.float32), k, keys))
  return out


def cluster_weights(params: Any, num_clusters: int, *, key: jax.Array | None = None, axis: Axis = None,
                    mask: Any = None, init: str = "kmeans++", prune_fraction: float = 0.0,
                    codebook_dtype: Any = "float32") -> Quantized:
  """Post-training weight clustering: per-tensor (or per-group) 1-D k-means (the usual baseline).

  What TensorFlow Model Optimization's ``cluster_weights`` and Core ML's
  palettization do: each masked tensor gets its own ``num_clusters`` shared
  values, the k-means centroids of its weights, and every weight takes its
  nearest centroid. With ``axis`` (the axes of one group, as for
  :func:`~softshare_jax.quantize`; ``axis=0`` on a Dense kernel ``(in, out)``
  = one codebook per output neuron, Core ML's per-channel palettization)
  each group gets its own ``num_clusters`` values. With ``prune_fraction >
  0`` the smallest-magnitude fraction of each group is first set to zero
  (magnitude pruning, Han et al.) and stays out of the clustering; zero then
  counts as one of the ``num_clusters`` codebook entries, so k-means fits
  ``num_clusters − 1`` centroids to the survivors and the index width is the
  same with or without pruning.

  Initialization: ``"kmeans++"`` (seeded with ``key`` on a sample of up to
  2^14 weights per group, drawn with replacement) or ``"linear"`` (evenly
  spaced over [min, max], Han et al.'s choice). Lloyd's iterations then run
  on all the weights to a fixed point in float64 on the host.

  Args:
    params: a pytree of arrays.
    num_clusters: codebook entries per group, 1..256 (2..256 with pruning).
    key: a PRNG key (required by ``"kmeans++"``).
    axis: None (one codebook per tensor), an int or a tuple of ints.
    mask: which leaves (default: float leaves with ndim >= 2).
    init: ``"kmeans++"`` or ``"linear"``.
    prune_fraction: in [0, 1): the fraction of each group pruned first.
    codebook_dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"``
      or ``"int8"`` (with a float32 scale per group), as for
      :func:`~softshare_jax.quantize`.

  Returns:
    A :class:`Quantized`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> w = jnp.array([[-1.02, -0.98, 0.01], [1.0, 0.99, -0.02]])
    >>> q = ss.cluster_weights({"w": w}, 3, key=jax.random.key(0))
    >>> q.tree["w"].codebook.tolist()  # doctest: +NUMBER
    [-1.00, -0.005, 0.995]
    >>> ss.cluster_weights({"w": w}, 2, key=jax.random.key(0), axis=0).tree["w"].codebook.shape
    (3, 2)
  """
  checks.check_int("num_clusters", num_clusters, high=MAX_CODEBOOK)
  checks.check_choice("init", init, _CLUSTER_INITS)
  cb = check_codebook_dtype(codebook_dtype)
  if not 0.0 <= float(prune_fraction) < 1.0:
    raise ValueError(f"prune_fraction must be in [0, 1), got {prune_fraction!r}.")
  if prune_fraction > 0 and num_clusters < 2:
    raise ValueError("num_clusters must be >= 2 with prune_fraction > 0 (zero is one of the entries).")
  if init == "kmeans++":
    key = checks.require_key("cluster_weights", key)

  def one(i, path, leaf):
    w = host_weights(path, leaf)
    axes = normalize_axis(w.shape, axis)
    rows = to_rows_np(w, axes)
    g, d = rows.shape
    n_pruned = int(round(float(prune_fraction) * d))
    pruned = np.zeros((g, d), bool)
    if n_pruned:
      np.put_along_axis(pruned, np.argsort(np.abs(rows), axis=1, kind="stable")[:, :n_pruned], True, axis=1)
    k = num_clusters - (1 if n_pruned else 0)
    x = np.sort(rows[~pruned].reshape(g, d - n_pruned), axis=1)
    values = np.zeros_like(rows)
    centres = []
    if x.size:
      seeds = _seeds(x, k, jax.random.fold_in(key, i)) if init == "kmeans++" else None
      for r in range(g):
        # x[r] is sorted: its distinct values are where it steps (np.unique would sort again).
        distinct = x[r][np.concatenate([[True], x[r][1:] != x[r][:-1]])]
        if distinct.size <= k:
          centres.append(distinct)
        elif init == "linear":
          centres.append(lloyd_1d(x[r], np.linspace(x[r, 0], x[r, -1], k)))
        else:
          centres.append(lloyd_1d(x[r], seeds[r]))
    if g == 1 and axes is None:
      # One codebook: each weight's centre index is its component, and the leaf is built from
      # the K centres alone (no sort of the weights); pruned weights take a zero component.
      book, comp = nearest_index(rows[0], centres[0]) if centres else (np.zeros(0), np.zeros(d, np.int64))
      comp = np.where(pruned[0], book.size, comp)
      return leaf_from_components(path, comp, np.append(book, 0.0), w.shape, leaf.dtype, codebook_dtype=cb)
    for r, c in enumerate(centres):
      values[r, ~pruned[r]] = nearest_centres(rows[r, ~pruned[r]], c)
    return leaf_from_values(path, from_rows_np(values, w.shape, axes), w.shape, leaf.dtype, axis=axes,
                            codebook_dtype=cb)

  return map_masked("cluster_weights", params, mask, one)
