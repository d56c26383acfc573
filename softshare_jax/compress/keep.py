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
from softshare_jax.compress.quantized import check_quantized
from softshare_jax.compress.quantized import group_ids
from softshare_jax.compress.quantized import is_qleaf
from softshare_jax.compress.quantized import Quantized
from softshare_jax.compress.quantized import QuantizedLeaf
from softshare_jax.compress.quantized import unpack
from softshare_jax.sharding import like
from softshare_jax.sharding import shard_alike

_REDUCTIONS = ("mean", "sum")


class KeepClustersState(NamedTuple):
  """State of :func:`keep_clusters`.

  Attributes:
    ids: a dict from canonical path (``"conv/kernel"``) to the leaf's cluster
      ids, for the quantized leaves among the params given to ``init``: each
      weight's entry in its group's codebook, in the leaf's own shape, as
      uint8 (K <= 256 entries), uint16 (K <= 65536) or int32, placed with the
      param's sharding. Each device then holds the ids of its own weights only.
    scales: a dict from the same paths to ``(groups × K,)`` factors applied
      to each cluster's summed update: 1/|c| ("mean") or 1 ("sum"), and 0 for
      the zero cluster.
  """

  ids: Any
  scales: Any


def ids_dtype(entries: int) -> np.dtype:
  """The narrowest dtype for ids below ``entries``: uint8, uint16, else int32 (what indexing takes).

  Example:
    >>> ids_dtype(16), ids_dtype(300), ids_dtype(70000)
    (dtype('uint8'), dtype('uint16'), dtype('int32'))
  """
  if entries <= 1 << 8:
    return np.dtype(np.uint8)
  return np.dtype(np.uint16) if entries <= 1 << 16 else np.dtype(np.int32)


def host_ids(q: QuantizedLeaf) -> np.ndarray:
  """The leaf's cluster ids on the host, in its shape and :func:`ids_dtype`.

  NumPy, from the concrete packed indices: also inside a jit trace of
  ``init``, so that the compiled program gets the ids as one constant and no
  unpacking.
  """
  idx = unpack(np.asarray(q.indices), q.bits, q.size, np)
  return idx.reshape(q.shape).astype(ids_dtype(q.entries))


def placed(value: np.ndarray, param: Any, *, replicated: bool = False) -> jax.Array:
  """``value`` laid out like ``param`` (each device receives its own block only), or replicated on its devices.

  A concrete param (or a ``ShapeDtypeStruct`` with a sharding) gives its
  sharding; under ``jit`` the param is a tracer whose layout is only known at
  compile time, so a param-shaped value is tied to it (``shard_alike``) for
  the partitioner. Anything else (NumPy, an uncommitted array, no sharding)
  gets JAX's default placement.
  """
  if isinstance(param, jax.core.Tracer):
    new = jnp.asarray(value)
    return new if replicated or shard_alike is None else shard_alike(param, new)[1]
  sharding = getattr(param, "sharding", None)
  # An uncommitted param (made without a placement) gets an uncommitted value: a committed
  # input would commit jit's outputs, and the next step's state would retrace.
  if not isinstance(sharding, jax.sharding.Sharding) or not getattr(param, "committed", True):
    return jnp.asarray(value)
  if replicated and not sharding.is_fully_replicated:
    if not isinstance(sharding, jax.sharding.NamedSharding):
      return jnp.asarray(value)
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  # Fills only this process's devices, so it also holds for a multi-process global param.
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def cluster_factors(q: QuantizedLeaf, ids: np.ndarray, reduce: str) -> np.ndarray:
  """``(groups × K,)`` float32: 1/|c| ("mean") or 1 ("sum") per cluster, 0 for the zero cluster."""
  n = q.groups * q.entries
  seg = ids.astype(np.int64) if q.axis is None else group_ids(q.shape, q.axis) * np.int64(q.entries) + ids
  factor = np.ones(n, np.float32)
  if reduce == "mean":
    factor = (1.0 / np.maximum(np.bincount(seg.ravel(), minlength=n), 1)).astype(np.float32)
  book = np.asarray(q.codebook).astype(np.float32)  # QuantizedLeaf.table() in NumPy: init may be traced
  if q.scale is not None:
    book = book * np.asarray(q.scale, np.float32)[..., None]
  return np.where(book.reshape(-1) == 0, np.float32(0), factor)


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
    An ``optax.GradientTransformationExtraArgs`` whose state
    (:class:`KeepClustersState`) holds, for each quantized leaf among the
    params given to ``init``, its cluster ids in the leaf's shape (uint8 up
    to 256 entries, uint16 up to 65536, else int32) placed with the param's
    sharding, and the per-cluster factors (``groups × K`` floats). An update
    then reads the ids of each device's own weights: nothing is unpacked or
    gathered.
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
  # steps (a QuantizedLeaf inside one comes back as a State of its arrays). The
  # state likewise holds plain arrays by path, which survive such rewrites.
  clusters = {path: leaf for path, leaf in quantized.leaves_with_paths() if is_qleaf(leaf)}
  known = [path for path, _ in quantized.leaves_with_paths()]
  if len(set(known)) != len(known):
    twice = next(p for p in known if known.count(p) > 1)
    raise ValueError(f"quantized: two of its leaves have the path {twice!r} (keys joined by '/'); "
                     "keep_clusters matches leaves by path.")

  def matched(tree, what):
    """The tree's leaves, its treedef, and ``(index, path)`` of its quantized, non-None leaves.

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
      q = clusters.get(path)
      if q is None or leaf is None:
        continue
      if tuple(np.shape(leaf)) != q.shape:
        raise ValueError(f"keep_clusters: {what} leaf {path!r} has shape {tuple(np.shape(leaf))}, "
                         f"its quantized leaf {q.shape}.")
      hits.append((i, path))
    return [leaf for _, leaf in flat], treedef, hits

  def held(state, paths):
    """path -> (ids, factors) from ``state``, for ``paths``; an error for a state that lacks them.

    Passing a quantized leaf's update through unchanged would be a silent
    wrong answer, so a state without its ids (hand-made, or rewritten by a
    checkpointer or a wrapper) is refused.
    """
    ids, scales = getattr(state, "ids", None), getattr(state, "scales", None)
    ok = isinstance(ids, Mapping) and isinstance(scales, Mapping) and set(ids) <= set(clusters)
    ok = ok and all(p in ids and p in scales and tuple(np.shape(ids[p])) == clusters[p].shape
                    and jnp.issubdtype(jnp.result_type(ids[p]), jnp.integer)
                    and np.shape(scales[p]) == (clusters[p].groups * clusters[p].entries,) for p in paths)
    if not ok:
      raise ValueError("keep_clusters: its state must hold the quantized leaves' cluster ids by path, each in "
                       f"its leaf's shape ({ {p: clusters[p].shape for p in paths} }); got "
                       f"{type(state).__name__} {state!r:.200}.")
    return {p: (ids[p], scales[p]) for p in paths}

  def init_fn(params):
    leaves, _, hits = matched(params, "params")
    ids, scales = {}, {}
    for i, path in hits:
      q = clusters[path]
      host = host_ids(q)
      ids[path] = placed(host, leaves[i])
      scales[path] = placed(cluster_factors(q, host, reduce), leaves[i], replicated=True)
    return KeepClustersState(ids, scales)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    leaves, treedef, hits = matched(updates, "updates")
    stored = held(state, [path for _, path in hits])
    for i, path in hits:
      q, (ids, factor) = clusters[path], stored[path]
      u, n = leaves[i], q.groups * q.entries
      # The ids are in the leaf's own shape and sharding: a sharded update is summed
      # where it lives (a scatter-add of the local block) and only the n sums cross devices.
      seg = jnp.asarray(ids).astype(jnp.int32)
      if q.axis is not None:
        seg = q.group_ids() * q.entries + seg
      leaves[i] = like(u, (cluster_sums(u, seg, n) * factor)[seg])
    return jax.tree_util.tree_unflatten(treedef, leaves), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
