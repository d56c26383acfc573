"""Fine-tuning after quantization with the clusters kept: an Optax transform."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softshare_jax import checks
from softshare_jax import masks
from softshare_jax.sharding import like
from softshare_jax.compress.quantized import check_quantized
from softshare_jax.compress.quantized import is_qleaf
from softshare_jax.compress.quantized import Quantized

_REDUCTIONS = ("mean", "sum")


class KeepClustersState(NamedTuple):
  """State of :func:`keep_clusters`.

  Attributes:
    clusters: a dict from canonical path (``"conv/kernel"``) to the quantized
      leaf (codebook and packed indices), for the quantized leaves only.
    scales: a dict from the same paths to ``(groups × K,)`` factors applied
      to each cluster's summed update: 1/|c| ("mean") or 1 ("sum"), and 0 for
      the zero cluster.
  """

  clusters: Any
  scales: Any


# Partial sums per block of rows, then a reduction over the blocks: one float32 scatter-add
# over a whole cluster of 1e5+ weights drifts by ~1e-3 relative, a block's by far less.
_SUM_BUDGET = 1 << 22


def cluster_sums(u: jax.Array, seg: jax.Array, n: int) -> jax.Array:
  """``(n,)`` float32 sums of ``u`` per cluster id ``seg`` (same shape as ``u``).

  Shape-keeping (no flattening), so a sharded ``u`` is summed where it lives
  and only the n sums cross devices. The sums are taken per block of rows
  (axis 0) and then added, which keeps float32 rounding to the size of a
  block instead of a whole cluster.

  Example:
    >>> import jax.numpy as jnp
    >>> cluster_sums(jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([[0, 1], [1, 1]]), 2)
    Array([1., 9.], dtype=float32)
  """
  u = jnp.asarray(u, jnp.float32)
  if u.ndim == 0:
    u, seg = u.reshape(1), seg.reshape(1)
  rows = u.shape[0]
  blocks = max(1, min(rows, _SUM_BUDGET // max(n, 1)))
  per = -(-rows // blocks)
  block = jax.lax.broadcasted_iota(jnp.int32, u.shape, 0) // per
  partial = jnp.zeros((-(-rows // per), n), jnp.float32).at[block, seg].add(u)
  return jnp.sum(partial, axis=0)


def keep_clusters(quantized: Quantized, *, reduce: str = "mean") -> optax.GradientTransformationExtraArgs:
  """Fine-tuning after quantization: one update per cluster, zeros kept at zero.

  For each quantized leaf, weight i in cluster c(i) gets

      u_i ← A_c(i),   A_c = 1/|c| Σ_{j∈c} u_j  ("mean")  or  Σ_{j∈c} u_j  ("sum")

  and A_c = 0 for the cluster whose codebook value is exactly 0 (pruned
  weights). With grouped codebooks (``axis=``) a cluster is one entry of one
  group's codebook: weights of two groups never share an update. ``"sum"`` is the gradient of one truly shared value (what
  Deep Compression's centroid fine-tuning and HashedNets train). Place it
  BEFORE the optimizer, starting from ``dequantize(quantized)``:
  ``optax.chain(ss.keep_clusters(q), optax.adam(1e-4))``. Every weight of a
  cluster then sees the same gradient, so any optimizer that treats elements
  alike (SGD, momentum, Adam, ...) keeps them equal, and zeros get zero
  gradients and stay zero. Leaves that were not quantized pass through. Leaves
  are matched by their paths, so it also acts on a part of the tree (inside
  ``optax.masked`` or ``optax.partition``); a leaf the quantized tree lacks
  is an error.

  Args:
    quantized: a :class:`Quantized` (from :func:`quantize`,
      :func:`cluster_weights` or :func:`hash_clusters`).
    reduce: ``"mean"`` (default) or ``"sum"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state holds the packed indices
    (1–8 bits per weight, 16 or 32 for hashed leaves).
    Under ``optax.inject_hyperparams`` it needs no ``static_args``:
    ``quantized`` is neither a number nor a callable and ``reduce`` is a
    string.

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
  check_quantized(quantized)
  checks.check_choice("reduce", reduce, _REDUCTIONS)
  # Keyed by path, not in the quantized tree's structure: a tree quantized from an
  # nnx.State holds its leaves in Variables, which nnx.Optimizer rewrites between
  # steps (a QuantizedLeaf inside one comes back as a State of its arrays).
  clusters = {path: leaf for path, leaf in quantized.leaves_with_paths() if is_qleaf(leaf)}
  known = [path for path, _ in quantized.leaves_with_paths()]
  if len(set(known)) != len(known):
    twice = next(p for p in known if known.count(p) > 1)
    raise ValueError(f"quantized: two of its leaves have the path {twice!r} (keys joined by '/'); "
                     "keep_clusters matches leaves by path.")

  def by_path(state):
    """path -> (quantized leaf, scales) for the quantized leaves held in ``state``."""
    held = dict(state.clusters.items()) if isinstance(state.clusters, Mapping) else None
    if held is None or sorted(held) != sorted(clusters) or not all(map(is_qleaf, held.values())):
      raise ValueError("keep_clusters: its state must hold the quantized leaves it was made with, by path "
                       f"({sorted(clusters)}); got {type(state.clusters).__name__} {state.clusters!r:.200}.")
    return {path: (q, state.scales[path]) for path, q in held.items()}

  def matched(tree, quantized_leaves, what):
    """The tree's leaves and, for those that were quantized, ``(index, entry)``.

    Leaves are matched by canonical path, so the transform also works on a
    part of the tree (inside ``optax.masked`` or ``optax.partition``), and
    ``nnx.Optimizer``'s pure updates ("conv/kernel") match a tree quantized
    from an ``nnx.State`` ("conv/kernel/value").
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    hits = []
    for i, (keys, leaf) in enumerate(flat):
      path = masks.canonical_path(keys)
      if path not in known:
        raise ValueError(f"keep_clusters: the {what} have a leaf {path!r} that the quantized tree lacks "
                         f"(its leaves: {known}); build the params with ss.dequantize(quantized).")
      entry = quantized_leaves.get(path)
      if entry is None or leaf is None:
        continue
      if tuple(np.shape(leaf)) != entry[0].shape:
        raise ValueError(f"keep_clusters: {what} leaf {path!r} has shape {tuple(np.shape(leaf))}, "
                         f"its quantized leaf {entry[0].shape}.")
      hits.append((i, entry))
    return [leaf for _, leaf in flat], treedef, hits

  def segments(q):
    """Each weight's cluster: (group, entry), flattened; and the number of clusters."""
    idx = q.unpacked()
    if q.axis is None:
      return idx, q.entries
    return q.group_ids().reshape(-1) * q.entries + idx, q.groups * q.entries

  def scale(q):
    seg, n = segments(q)
    factor = jnp.ones((n,), jnp.float32)
    if reduce == "mean":
      factor = factor / jnp.maximum(jax.ops.segment_sum(jnp.ones((q.size,), jnp.float32), seg, n), 1.0)
    return jnp.where(q.table().reshape(-1) == 0, 0.0, factor)

  def init_fn(params):
    state = KeepClustersState(clusters, {path: scale(q) for path, q in clusters.items()})
    matched(params, by_path(state), "params")
    return state

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    leaves, treedef, hits = matched(updates, by_path(state), "updates")
    for i, (q, factor) in hits:
      u, (seg, n) = leaves[i], segments(q)
      # In the leaf's own shape and sharding: flattening a sharded update would make XLA
      # gather it; a scatter-add of the local block and an all-reduce of the n sums do not.
      seg = like(u, seg.reshape(u.shape)).astype(jnp.int32)
      leaves[i] = like(u, (cluster_sums(u, seg, n) * factor)[seg])
    return jax.tree_util.tree_unflatten(treedef, leaves), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
