"""Weight-sharing regularization (Shakerinava et al. 2024) and its exact prox.

    R(w) = 1/(d−1) Σ_{i>j} |w_i − w_j|

pulls every pair of weights in a group together; its proximal map merges
weights into clusters of exactly equal values, which is weight sharing that the
network discovers by itself (docs/design.md §4.2). The isotonic kernels that
solve the prox live in :mod:`softshare_jax.isotonic`; the Optax transform that
applies it after an optimizer step in :mod:`softshare_jax.sharing_prox`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from softshare_jax import checks
from softshare_jax import isotonic
from softshare_jax.groups import Axis
from softshare_jax.groups import to_rows

METHODS = ("auto", "device", "host")


def check_float(x: jax.Array) -> None:
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(
        f"x must be a floating-point array, got dtype {jnp.result_type(x)}; "
        "cast it first, e.g. x.astype(jnp.float32)."
    )


def compute_dtype(dtype) -> np.dtype:
  """The dtype the prox computes in: float32 for float32 and narrower, float64 for float64."""
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


def _scalar(name: str, value, dtype) -> jax.Array:
  """``value`` as a scalar of ``dtype``; a concrete value beyond its range is clamped.

  Clamping is exact: any strength above the spread of a group already gives
  the group mean, and any l1 above the largest weight already gives zeros.
  """
  if not checks.is_traced(value):
    value = np.minimum(np.asarray(value, np.float64), np.finfo(dtype).max)
  v = jnp.asarray(value).astype(dtype)
  if v.ndim:
    raise ValueError(f"{name} must be a scalar, got {value!r} (shape {v.shape}).")
  return v


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
  check_float(x)
  rows, _ = to_rows(x, axis)
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
  out = jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.pure_callback(_host_fit, out, x, t, vmap_method="expand_dims")


# Jitted once per shape, so eager calls do not re-trace the kernel's loops.
_fit_device = jax.jit(isotonic.prox_rows_device)


def _fit(x: jax.Array, t: jax.Array, method: str) -> jax.Array:
  """prox of t·R on every row of x (float32 or float64), without the l1 term."""
  t = jnp.broadcast_to(t, x.shape[:1])
  if method == "device":
    return _fit_device(x, t)
  if method == "host":
    return _fit_host(x, t)
  return lax.platform_dependent(x, t, cpu=_fit_host, default=_fit_device)


def _soft_threshold(y: jax.Array, s: jax.Array) -> jax.Array:
  # A NaN or negative l1 (possible only traced) has no prox: NaN, not a push outwards.
  return jnp.where(s >= 0, jnp.sign(y) * jnp.maximum(jnp.abs(y) - s, 0.0), jnp.nan)


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
  count = jax.ops.segment_sum(jnp.ones(n_seg, x.dtype), ids, n_seg)[ids]
  start = jax.ops.segment_min(k.ravel(), ids, n_seg)[ids]
  dz = jnp.take_along_axis(dx, perm, axis=1).ravel()
  mean_dz = jax.ops.segment_sum(dz, ids, n_seg)[ids] / count
  ramp = (2 * start + count - d).astype(x.dtype) / max(d - 1, 1)
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
  (before the l1 step); a strength of at least the group's spread
  (max − min) gives the group mean exactly, however large (so do strengths
  beyond the float range); strength 0 returns ``x`` bit for bit.

  Groups are independent: a group holding a NaN or an infinity comes back all
  NaN (the prox of a non-finite point is undefined) and leaves the other groups
  alone; a group of one weight has R = 0 and only gets the l1 step. A NaN or
  negative strength or l1, possible only when traced, gives NaN. An empty ``x``
  comes back as it is.

  Args:
    x: a floating-point array; bf16/f16 are computed in float32, float64 (under
      ``jax_enable_x64``) in float64, and returned in their own dtype.
    strength: t >= 0, the weight of R.
    l1: s >= 0, the weight of the ℓ1 term.
    axis: the axes that form one group (None: the whole array; ``()``: every
      weight its own group). A scalar ``x`` takes only None or ``()``.
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
  check_float(x)
  checks.check_nonnegative("strength", strength)
  checks.check_nonnegative("l1", l1)
  checks.check_choice("method", method, METHODS)
  rows, back = to_rows(x, axis)
  dtype = compute_dtype(x.dtype)
  t = _scalar("strength", strength, dtype)
  s = _scalar("l1", l1, dtype)
  if rows.size == 0:
    return x
  rows = rows.astype(dtype)
  if rows.shape[-1] == 1:
    out = _soft_threshold(jnp.where(t >= 0, rows, jnp.nan), s)
  else:
    out = _prox_rows(rows, t, s, method)
  return back(out).astype(x.dtype)
