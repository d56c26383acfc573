"""Weight-sharing regularization (Shakerinava et al. 2024) and its exact prox.

    R(w) = 1/(d−1) Σ_{i>j} |w_i − w_j|

pulls every pair of weights in a group together; its proximal map merges
weights into clusters of exactly equal values, which is weight sharing that the
network discovers by itself. ``axis`` names the axes that form one group, like
a reduction axis: ``None`` makes the whole leaf one group, ``axis=0`` on a
Dense kernel ``(in, out)`` gives one group per output neuron.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from softshare_jax import isotonic
from softshare_jax import _checks
from softshare_jax import masks

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]
Axis = Union[None, int, Sequence[int]]

_METHODS = ("auto", "device", "host")


# ----------------------------------------------------------------------------
# Argument checks.


def _check_float(x: jax.Array) -> None:
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(
        f"x must be a floating-point array, got dtype {jnp.result_type(x)}; "
        "cast it first, e.g. x.astype(jnp.float32)."
    )


def _group_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
  if axis is None:
    return tuple(range(ndim))
  if isinstance(axis, (jax.Array, np.ndarray)) and np.ndim(axis) == 0 and not isinstance(axis, jax.core.Tracer):
    axis = int(axis)
  if not isinstance(axis, (int, np.integer, tuple, list)):
    raise ValueError(
        f"axis must be None, an int or a tuple of ints, got {type(axis).__name__}. "
        "Under optax.inject_hyperparams, pass static_args=('axis',)."
    )
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  out = []
  for a in axes:
    if not isinstance(a, (int, np.integer)) or not -ndim <= a < max(ndim, 1):
      raise ValueError(f"axis {axis!r} is out of range for an array of rank {ndim}.")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"axis {axis!r} repeats an axis.")
  return tuple(sorted(out))


def _to_rows(x: jax.Array, axis: Axis) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
  """Reshapes ``x`` to ``(groups, d)``; returns the rows and the inverse map."""
  axes = _group_axes(x.ndim, axis)
  rest = tuple(a for a in range(x.ndim) if a not in axes)
  moved = jnp.transpose(x, rest + axes)
  d = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
  rows = moved.reshape(-1, d)
  inverse_perm = tuple(int(i) for i in np.argsort(rest + axes))

  def back(r):
    return jnp.transpose(r.reshape(moved.shape), inverse_perm)

  return rows, back


# ----------------------------------------------------------------------------
# The penalty.


def weight_sharing_penalty(x: jax.Array, axis: Axis = None) -> jax.Array:
  """R(x) = 1/(d−1) Σ_{i>j} |x_i − x_j|, summed over the groups of ``x``.

  With ``z`` the group sorted ascending (1-indexed), R = 1/(d−1) Σ_k (2k − d − 1) z_k:
  one sort and a weighted sum, O(d log d). Differentiable with ``jax.grad``.
  Groups of one weight contribute 0.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> float(ss.weight_sharing_penalty(jnp.array([0.0, 1.0, 3.0])))  # (1 + 3 + 2) / 2
    3.0
  """
  x = jnp.asarray(x)
  _check_float(x)
  rows, _ = _to_rows(x, axis)
  d = rows.shape[-1]
  if d < 2 or rows.size == 0:
    return jnp.zeros((), jnp.result_type(x, jnp.float32))
  z = jnp.sort(rows.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=-1)
  ramp = jnp.arange(1 - d, d, 2, dtype=z.dtype)
  return jnp.sum(z @ ramp) / (d - 1)


# ----------------------------------------------------------------------------
# The proximal map.


def _host_fit(x: np.ndarray, t: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  t = np.asarray(t)
  lead = np.broadcast_shapes(x.shape[:-1], t.shape)
  return isotonic.prox_rows_host(np.broadcast_to(x, lead + x.shape[-1:]), np.broadcast_to(t, lead))


def _fit_host(x: jax.Array, t: jax.Array) -> jax.Array:
  out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  return jax.pure_callback(_host_fit, out, x, t, vmap_method="expand_dims")


# Jitted once per shape, so eager calls do not re-trace the kernel's loops.
_fit_device = jax.jit(isotonic.prox_rows_device)


def _fit(x: jax.Array, t: jax.Array, method: str) -> jax.Array:
  """prox of t·R on every row of x (float32), without the l1 term."""
  t = jnp.broadcast_to(t, x.shape[:1])
  if method == "device":
    return _fit_device(x, t)
  if method == "host":
    return _fit_host(x, t)
  return lax.platform_dependent(x, t, cpu=_fit_host, default=_fit_device)


def _soft_threshold(y: jax.Array, s: jax.Array) -> jax.Array:
  return jnp.sign(y) * jnp.maximum(jnp.abs(y) - s, 0.0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _prox_rows(x, t, s, method):
  return _soft_threshold(_fit(x, t, method), s)


@_prox_rows.defjvp
def _prox_rows_jvp(method, primals, tangents):
  x, t, s = primals
  dx, dt, ds = tangents
  y = _fit(x, t, method)
  out = _soft_threshold(y, s)
  rows, d = x.shape
  # The clusters are the runs of equal values of y in sorted order. Inside a
  # cluster [i, j) the fit is mean(z) − a·(i + j − d), so its tangent is the
  # mean input tangent minus da·(i + j − d).
  k = lax.broadcasted_iota(jnp.int32, x.shape, 1)
  ys, perm = lax.sort((y, k), dimension=1, num_keys=1)
  new = jnp.concatenate([jnp.ones((rows, 1), bool), ys[:, 1:] != ys[:, :-1]], axis=1)
  ids = (jnp.cumsum(new, axis=1) - 1 + lax.broadcasted_iota(jnp.int32, x.shape, 0) * d).ravel()
  n_seg = rows * d
  count = jax.ops.segment_sum(jnp.ones(n_seg, jnp.float32), ids, n_seg)[ids]
  start = jax.ops.segment_min(k.ravel(), ids, n_seg)[ids]
  dz = jnp.take_along_axis(dx, perm, axis=1).ravel()
  mean_dz = jax.ops.segment_sum(dz, ids, n_seg)[ids] / count
  ramp = (2 * start + count - d).astype(jnp.float32) / max(d - 1, 1)
  dys = (mean_dz - dt * ramp).reshape(x.shape)
  dy = jnp.zeros_like(dys).at[lax.broadcasted_iota(jnp.int32, x.shape, 0), perm].set(dys, unique_indices=True)
  dout = jnp.where(jnp.abs(y) > s, dy - jnp.sign(y) * ds, 0.0)
  return out, dout


def prox_weight_sharing(
    x: jax.Array,
    strength: float | jax.Array,
    *,
    l1: float | jax.Array = 0.0,
    axis: Axis = None,
    method: str = "auto",
) -> jax.Array:
  """Exact proximal map of ``strength · R + l1 · ‖·‖₁`` on every group of ``x``.

      prox(y) = argmin_w ½‖w − y‖² + strength · R(w) + l1 · ‖w‖₁

  The prox keeps the order of ``y``: sort (z = sorted y), fit a non-decreasing
  sequence to ``z − a(2k − d − 1)`` with ``a = strength/(d − 1)``, undo the
  sort, then soft-threshold by ``l1``. Weights whose fitted values meet form a
  cluster of exactly equal values. Each weight moves by at most ``strength``
  (before the l1 step); a large strength gives the group mean.

  Args:
    x: a floating-point array; bf16/f16 are computed in float32 and returned in
      their own dtype.
    strength: t >= 0, the weight of R.
    l1: s >= 0, the weight of the ℓ1 term.
    axis: the axes that form one group (None: the whole array).
    method: ``"device"`` (pure JAX: sort, parallel pooling, then a
      bounded-depth merge; any backend), ``"host"`` (NumPy/SciPy through a
      host callback, the fastest path on CPU), or ``"auto"`` (host on CPU,
      device elsewhere, chosen per backend at lowering).

  Returns:
    The prox, with the shape and dtype of ``x``. Differentiable: inside a
    cluster the tangent is the mean of the input tangents, and weights zeroed
    by ``l1`` pass no tangent.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> ss.prox_weight_sharing(jnp.array([0.0, 0.05, 1.0]), 0.1)  # 0 and 0.05 merge
    Array([0.075, 0.075, 0.9  ], dtype=float32)
  """
  x = jnp.asarray(x)
  _check_float(x)
  _checks.check_nonnegative("strength", strength)
  _checks.check_nonnegative("l1", l1)
  if method not in _METHODS:
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
  rows, back = _to_rows(x, axis)
  t = jnp.asarray(strength, jnp.float32)
  s = jnp.asarray(l1, jnp.float32)
  if t.ndim or s.ndim:
    raise ValueError("strength and l1 must be scalars.")
  if rows.size == 0:
    return x
  r32 = rows.astype(jnp.float32)
  if rows.shape[-1] == 1:
    out = _soft_threshold(r32, s)
  else:
    out = _prox_rows(r32, t, s, method)
  return back(out).astype(x.dtype)


# ----------------------------------------------------------------------------
# The Optax transformation.


class WeightSharingProxState(NamedTuple):
  """State of :func:`weight_sharing_prox`: the step count, for schedules."""

  count: chex.Array


def _value_at(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  return value(count) if callable(value) else value


def weight_sharing_prox(
    strength: ScalarOrSchedule,
    learning_rate: ScalarOrSchedule,
    *,
    l1: float = 0.0,
    axis: Axis = None,
    mask: Any = None,
    method: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  """Proximal step of the weight-sharing regularizer, after any optimizer.

  Turns the optimizer's step ``u`` into ``prox(w + u) − w``, so that
  ``optax.apply_updates`` lands on the prox of the tentative new weights:

      w ← prox_{η_t·λ·R + η_t·l1·‖·‖₁}(w + u),   η_t = learning_rate(count)

  This is proximal gradient descent on ``loss + λ R(w) + l1 ‖w‖₁``. Place it
  LAST in the chain, after the optimizer has produced its final step (its
  ``learning_rate`` should be the optimizer's, so the prox step matches).

  Args:
    strength: λ >= 0, float or schedule.
    learning_rate: η >= 0, float or optax schedule (the optimizer's).
    l1: weight of an ℓ1 term, scaled by the learning rate like ``strength``.
    axis: the axes that form one group (see :func:`prox_weight_sharing`).
    mask: which leaves (a pytree of bools or a callable, as in ``optax.masked``;
      default: every floating-point leaf). Others pass through.
    method: as in :func:`prox_weight_sharing`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.
    Under ``optax.inject_hyperparams`` (to change ``strength`` or
    ``learning_rate`` during training), mark an int ``axis`` static:
    ``optax.inject_hyperparams(ss.weight_sharing_prox, static_args=("axis",))``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import softshare_jax as ss
    >>> params = {"w": jnp.array([0.30, 0.31, -0.2, 0.9])}
    >>> tx = optax.chain(optax.sgd(0.1), ss.weight_sharing_prox(0.5, 0.1))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.zeros_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> ss.sharing_stats(params).total.distinct  # 0.30 and 0.31 merged
    3
  """
  _checks.check_nonnegative("strength", strength)
  _checks.check_nonnegative("learning_rate", learning_rate)
  _checks.check_nonnegative("l1", l1)
  if method not in _METHODS:
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")

  def init_fn(params):
    del params
    return WeightSharingProxState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("weight_sharing_prox needs params: call update(updates, state, params).")
    lr = _value_at(learning_rate, state.count)
    t = _value_at(strength, state.count) * lr
    s = l1 * lr
    keep = masks.resolve_mask(mask, params, masks.is_float_leaf)

    def step(u, p, on):
      if u is None or not on:
        return u
      w = p.astype(jnp.float32) + u.astype(jnp.float32)
      new = prox_weight_sharing(w, t, l1=s, axis=axis, method=method)
      return (new - p.astype(jnp.float32)).astype(u.dtype)

    updates = jax.tree.map(step, updates, params, keep, is_leaf=lambda u: u is None)
    return updates, WeightSharingProxState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------
# Statistics.


@dataclasses.dataclass(frozen=True)
class LeafStats:
  """Counts for one leaf (or the total): weights, distinct values, exact zeros."""

  weights: int
  distinct: int
  zeros: int


@dataclasses.dataclass(frozen=True)
class SharingStats:
  """Per-leaf and total :class:`LeafStats`; ``str()`` is a table.

  ``total.distinct`` adds up the leaves' distinct values: the codebook entries
  needed when every leaf keeps its own codebook.
  """

  leaves: dict[str, LeafStats]
  total: LeafStats

  def to_dict(self) -> dict:
    return {"leaves": {k: dataclasses.asdict(v) for k, v in self.leaves.items()},
            "total": dataclasses.asdict(self.total)}

  def __str__(self) -> str:
    rows = [(k, v) for k, v in self.leaves.items()] + [("total", self.total)]
    width = max(len("leaf"), *(len(k) for k, _ in rows))
    lines = [f"{'leaf':<{width}} {'weights':>10} {'distinct':>10} {'zeros':>10}"]
    lines += [f"{k:<{width}} {v.weights:>10} {v.distinct:>10} {v.zeros:>10}" for k, v in rows]
    return "\n".join(lines)


def sharing_stats(params: Any, mask: Any = None) -> SharingStats:
  """How much the weights share: per leaf, the weights, distinct values and zeros.

  Args:
    params: a pytree of arrays.
    mask: which leaves to count (pytree of bools or callable; default: every
      floating-point leaf).

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> stats = ss.sharing_stats({"w": jnp.array([0.0, 0.5, 0.5, 0.0])})
    >>> stats.leaves["w"]
    LeafStats(weights=4, distinct=2, zeros=2)
  """
  keep = masks.resolve_mask(mask, params, masks.is_float_leaf)
  leaves = {}
  for (path, leaf), (_, on) in zip(masks.leaves_with_paths(params), masks.leaves_with_paths(keep)):
    if not on:
      continue
    a = np.asarray(jax.device_get(leaf)).ravel()
    leaves[path] = LeafStats(int(a.size), int(np.unique(a).size), int(np.count_nonzero(a == 0)))
  total = LeafStats(*(sum(getattr(v, f) for v in leaves.values()) for f in ("weights", "distinct", "zeros")))
  return SharingStats(leaves, total)
