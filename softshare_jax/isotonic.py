"""Kernels for the proximal map of the weight-sharing regularizer.

Every kernel here solves, for each row ``x`` of a ``(rows, d)`` float32 (or
float64) array and a per-row step ``t``,

    prox(x) = argmin_w ½‖w − x‖² + t/(d−1) Σ_{i>j} |w_i − w_j|

by sorting ``x`` (``z`` ascending), fitting a non-decreasing sequence to
``v_k = z_k − a (2k − d − 1)`` with ``a = t/(d−1)`` (k is 1-indexed), and
undoing the sort. The fitted blocks are the shared weights.

Every kernel keeps one contract, row by row, whatever the other rows hold:

* ``t`` NaN or negative (possible only for a traced strength): the row is NaN.
* ``t == 0``, or ``d == 1``: the row itself, bit for bit.
* a NaN or an infinity in the row: the row is NaN (the prox of a non-finite
  point is undefined: every candidate is infinitely far from it).
* ``t >= max − min`` of the row (the device kernel: a hair above): the row's
  mean in every entry, or the row itself when all its entries are equal. The
  whole group is one cluster from ``t = (max − min)(d − 1)/d`` on
  (docs/design.md §4.2), so the mean is the exact answer, and it is computed
  without the ramp: no strength, however large (``inf`` included), loses the
  data to it.
* otherwise the fit above, where the ramp (at most ``t``) is no larger than
  the spread of the data.

Two kernels:

* :func:`prox_rows_device` is pure JAX (jit, vmap, any backend). Segment sums
  come from double-float (hi, lo) prefix sums of ``z``, so a block mean is
  accurate to the rounding of the dtype even at d = 1e7, and the ramp ``c``
  enters in closed form. The fit runs a few rounds of parallel pooling, which
  settles the inputs seen in training (small steps, spread-out weights); if
  violations remain, a divide-and-conquer pass (the bounded-depth algorithm of
  Shakerinava et al. 2024: merge fitted halves by the bridge of their convex
  minorants) finishes in O(log³ d) parallel depth whatever the input. It works
  in the dtype of ``x`` (float64 when ``x`` is, under ``jax_enable_x64``).
* :func:`prox_rows_host` runs on the host in float64: a small C kernel (radix
  sort, then linear-time pool adjacent violators) built at install time, or,
  without a compiler, :func:`prox_rows_numpy` (a NumPy sort and SciPy's
  pool-adjacent-violators). It takes float32 or float64 rows and returns their
  dtype.

The algorithms and the precision argument are written out in docs/design.md
§4.2. The building blocks of the device kernel (:class:`Segments`,
:func:`ramp`, :func:`pool`, :func:`violations`) are public here so that tests
and benchmarks can drive the pooling rounds on their own.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from scipy import optimize as _sp_optimize

try:  # The C host kernel, built at install time when a compiler is there.
  from softshare_jax import hostprox as host_kernel
except ImportError:  # pragma: no cover - depends on the build.
  host_kernel = None

# Pooling rounds before the bounded-depth pass takes over. Gaussian weights with
# a training-sized step settle in a handful; adversarial chains never would.
POOLING_ROUNDS = 16


# ----------------------------------------------------------------------------
# Double-float prefix sums: a segment sum taken as the difference of two float32
# prefix sums loses |prefix| · eps, which at d = 1e7 is of the order of the
# weights themselves. Carrying the rounding error of every addition (TwoSum)
# keeps the difference exact to float32 rounding of the segment itself.


def _two_sum(a, b):
  s = a + b
  bb = s - a
  err = (a - (s - bb)) + (b - bb)
  return s, err


def _df_add(x, y):
  hi, err = _two_sum(x[0], y[0])
  lo = x[1] + y[1] + err
  hi2 = hi + lo
  return hi2, lo - (hi2 - hi)


def _shift_right(a, by):
  pad = [(0, 0)] * (a.ndim - 1) + [(by, 0)]
  return jnp.pad(a[..., : a.shape[-1] - by], pad)


def _inclusive_scan(hi, lo):
  """Hillis-Steele scan in double-float along the last axis: log2(n) passes."""
  by = 1
  while by < hi.shape[-1]:
    hi, lo = _df_add((hi, lo), (_shift_right(hi, by), _shift_right(lo, by)))
    by *= 2
  return hi, lo


_BLOCK = 128


def prefix_sums(z: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Exclusive double-float prefix sums of ``z`` along its last axis.

  Returns ``(hi, lo)`` of shape ``(..., d + 1)`` with ``hi[..., 0] == 0`` and
  ``hi[..., k] + lo[..., k] ≈ Σ_{j<k} z[..., j]`` to about 2⁻⁴⁸ relative.
  Two levels (within blocks of 128, then across blocks) keep the work near
  8 passes over ``z`` and the program small.
  """
  d = z.shape[-1]
  nb = -(-d // _BLOCK)
  zp = jnp.pad(z, [(0, 0)] * (z.ndim - 1) + [(0, nb * _BLOCK - d)])
  zp = zp.reshape(*z.shape[:-1], nb, _BLOCK)
  hi, lo = _inclusive_scan(zp, jnp.zeros_like(zp))
  bh, bl = _inclusive_scan(hi[..., -1], lo[..., -1])
  bh, bl = _shift_right(bh, 1)[..., None], _shift_right(bl, 1)[..., None]
  hi, lo = _df_add((bh, bl), (hi, lo))
  hi = hi.reshape(*z.shape[:-1], nb * _BLOCK)[..., :d]
  lo = lo.reshape(*z.shape[:-1], nb * _BLOCK)[..., :d]
  pad = [(0, 0)] * (z.ndim - 1) + [(1, 0)]
  return jnp.pad(hi, pad), jnp.pad(lo, pad)


def _take(a, idx):
  return jnp.take_along_axis(a, idx, axis=-1, mode="clip")


class Segments:
  """Sums of v = z − a(2k − d − 1) over [i, j), from prefix sums of z."""

  def __init__(self, z, a):
    self.hi, self.lo = prefix_sums(z)
    self.a = a[:, None]
    self.d = z.shape[-1]
    self.dtype = z.dtype

  def sum(self, i, j):
    zs = (_take(self.hi, j) - _take(self.hi, i)) + (_take(self.lo, j) - _take(self.lo, i))
    n = (j - i).astype(self.dtype)
    # Σ_{k=i+1..j} (2k − d − 1) = (j − i)(i + j − d): the ramp needs no prefix sum.
    return zs - self.a * n * (i + j - self.d).astype(self.dtype)

  def mean(self, i, j):
    return self.sum(i, j) / jnp.maximum(j - i, 1).astype(self.dtype)


def _block_ends(starts_mask):
  """For each k, the first block start after k (or d)."""
  d = starts_mask.shape[-1]
  k = lax.broadcasted_iota(jnp.int32, starts_mask.shape, starts_mask.ndim - 1)
  nxt = jnp.where(starts_mask, k, d)
  nxt = jnp.concatenate([nxt[..., 1:], jnp.full_like(nxt[..., :1], d)], axis=-1)
  return lax.cummin(nxt, axis=nxt.ndim - 1, reverse=True)


def _refit(seg, starts_mask):
  """Block starts and block means from a mask of block starts."""
  k = lax.broadcasted_iota(jnp.int32, starts_mask.shape, starts_mask.ndim - 1)
  st = lax.cummax(jnp.where(starts_mask, k, 0), axis=k.ndim - 1)
  en = _block_ends(starts_mask)
  return st, seg.mean(st, en)


def violations(y: jax.Array, st: jax.Array) -> jax.Array:
  """True at each block start whose fitted value is below the previous block's."""
  k = lax.broadcasted_iota(jnp.int32, y.shape, y.ndim - 1)
  prev = jnp.concatenate([jnp.full_like(y[..., :1], -jnp.inf), y[..., :-1]], axis=-1)
  return (st == k) & (prev > y)


def pool(seg: Segments, v: jax.Array, rounds: int) -> tuple[jax.Array, jax.Array]:
  """Parallel pooling: every run of adjacent violating blocks merges at once.

  Runs at most ``rounds`` rounds (fewer when no violation is left) from the
  singleton blocks of ``v``; returns the fit and each element's block start.
  """
  k = lax.broadcasted_iota(jnp.int32, v.shape, v.ndim - 1)

  def cond(carry):
    y, st, i = carry
    return (i < rounds) & jnp.any(violations(y, st))

  def body(carry):
    y, st, i = carry
    keep = (st == k) & ~violations(y, st)
    st, y = _refit(seg, keep)
    return y, st, i + 1

  y, st, _ = lax.while_loop(cond, body, (v, k, jnp.int32(0)))
  return y, st


def _divide_and_conquer(seg, v):
  """Bounded-depth isotonic fit: ceil(log2 d) levels of bridge merges.

  At level l the row is cut into segments of 2^l whose halves are already
  fitted. Their fits are the slopes of the greatest convex minorants (GCM) of
  the halves' cumulative sums; the fit of the segment is the GCM of both,
  which keeps the left hull up to a vertex p, bridges to a right vertex q and
  keeps the right hull after q: only [p, q) changes, to one block. Every left
  element p finds its tangent q(p) to the right hull by binary search; the
  bridge starts at the first p whose tangent is not steeper than the hull
  leaving p. Depth O(log² d) in all, work O(d log² d).
  """
  rows, d = v.shape
  k = lax.broadcasted_iota(jnp.int32, v.shape, 1)
  row_base = lax.broadcasted_iota(jnp.int32, v.shape, 0) * d
  levels = max(1, math.ceil(math.log2(d)))

  def level_step(level, carry):
    y, st = carry
    size = jnp.left_shift(1, level)
    start = jnp.left_shift(jnp.right_shift(k, level), level)
    mid = jnp.minimum(start + size // 2, d)
    end = jnp.minimum(start + size, d)
    last = jnp.minimum(mid, d - 1)
    active = (mid < end) & (_take(y, mid - 1) > _take(y, last))
    left = k < mid

    def height(q):
      # H(q) − H(st(k)): the right half's hull at q above the block start of k.
      at_end = q >= end
      qc = jnp.minimum(q, d - 1)
      stq = jnp.where(at_end, end, _take(st, qc))
      return seg.sum(st, stq) + jnp.where(at_end, 0.0, (q - stq).astype(v.dtype) * _take(y, qc))

    def slope(q):
      offset = (k - st).astype(v.dtype) * y
      return (height(q) - offset) / jnp.maximum(q - k, 1).astype(v.dtype)

    def search(_, bounds):
      lo, hi = bounds
      q = (lo + hi) // 2
      touches = (q >= end) | (_take(y, jnp.minimum(q, d - 1)) >= slope(q))
      live = lo < hi
      return jnp.where(live & ~touches, q + 1, lo), jnp.where(live & touches, q, hi)

    def merge(carry):
      y, st = carry
      q, _ = lax.fori_loop(0, level + 1, search, (mid, end))
      bridge = left & active & (slope(q) <= y)
      first = jax.ops.segment_min(
          jnp.where(bridge, k, d).ravel(), (row_base + start).ravel(), rows * d
      )[(row_base + start).ravel()].reshape(v.shape)
      first = jnp.minimum(first, d - 1)
      mean = height(q) / jnp.maximum(q - st, 1).astype(v.dtype)
      p_start, p_q, p_mean = _take(st, first), _take(q, first), _take(mean, first)
      merged = active & (first < mid) & (k >= p_start) & (k < end) & (st < p_q)
      return jnp.where(merged, p_mean, y), jnp.where(merged, p_start, st)

    return lax.cond(jnp.any(active), merge, lambda c: c, (y, st))

  y, st = lax.fori_loop(1, levels + 1, level_step, (v, k))
  # One exact refit per block makes every member of a block bit-identical.
  _, y = _refit(seg, st == k)
  return y


def ramp(d: int, a: jax.Array) -> jax.Array:
  """``(rows, d)`` c_k = a (2k − d − 1), k = 1..d: what the prox subtracts from the sorted row."""
  k = jnp.arange(1, d + 1, dtype=a.dtype)
  return a[:, None] * (2.0 * k - (d + 1))


def _fit(seg: Segments, v: jax.Array, rounds: int) -> jax.Array:
  y, st = pool(seg, v, rounds)
  done = ~jnp.any(violations(y, st))
  return lax.cond(done, lambda: y, lambda: _divide_and_conquer(seg, v))


def isotonic_fit_sorted(z: jax.Array, a: jax.Array, *, rounds: int = POOLING_ROUNDS) -> jax.Array:
  """Non-decreasing least-squares fit of ``z − a(2k − d − 1)`` per row.

  Args:
    z: ``(rows, d)`` float32 (or float64), each row sorted ascending.
    a: ``(rows,)`` ramp slope, ``t / (d − 1)``, in the dtype of ``z``.
    rounds: pooling rounds tried before the bounded-depth pass.

  Returns:
    The fit, ``(rows, d)`` in the dtype of ``z``.
  """
  return _fit(Segments(z, a), z - ramp(z.shape[-1], a), rounds)


# A row is one cluster from t = (max − min)(d − 1)/d on; the device kernel
# tests t >= (max − min)(1 + 2⁻²⁰), a margin above the rounding of max − min
# at every d, so that the mean is only taken where it is the exact answer.
_COLLAPSE = 1.0 + 2.0**-20


def prox_rows_device(x: jax.Array, t: jax.Array) -> jax.Array:
  """Prox of ``t · R`` on every row of ``x``, in pure JAX, in the dtype of ``x``.

  ``x`` is ``(rows, d)`` float32 or float64, ``t`` broadcasts to ``(rows,)``;
  the row-by-row contract is the module's.

  Example:
    >>> import jax.numpy as jnp
    >>> from softshare_jax import isotonic
    >>> x = jnp.array([[0.0, 0.05, 1.0], [1.0, jnp.nan, 2.0], [11, 12, 13]])
    >>> isotonic.prox_rows_device(x, jnp.array([0.1, 0.1, 1e30]))
    Array([[ 0.075,  0.075,  0.9  ],
           [   nan,    nan,    nan],
           [12.   , 12.   , 12.   ]], dtype=float32)
  """
  rows, d = x.shape
  t = jnp.broadcast_to(jnp.asarray(t).astype(x.dtype), (rows,))
  valid = t >= 0  # False for NaN
  keep = (t == 0)[:, None]
  if x.size == 0:
    return x
  if d == 1:
    return jnp.where(valid[:, None], x, jnp.nan)
  finite = jnp.all(jnp.isfinite(x), axis=1)
  # Non-finite rows are answered NaN below; zeros keep them out of the sums.
  iota = lax.broadcasted_iota(jnp.int32, x.shape, 1)
  z, perm = lax.sort((jnp.where(finite[:, None], x, 0), iota), dimension=1, num_keys=1)
  spread = z[:, -1] - z[:, 0]
  collapse = t >= spread * _COLLAPSE
  # Rows answered without the fit run it with t = 0, which settles at once.
  a = jnp.where(valid & ~collapse, t, 0) / (d - 1)
  seg = Segments(z, a)
  y = _fit(seg, z - ramp(d, a), POOLING_ROUNDS)
  ends = (jnp.zeros((rows, 1), jnp.int32), jnp.full((rows, 1), d, jnp.int32))
  # All-equal rows keep their values: d · z / d need not round back to z.
  mean = jnp.where((spread == 0)[:, None], z, seg.mean(*ends))
  y = jnp.where(collapse[:, None], mean, y)
  r = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  out = jnp.zeros_like(y).at[r, perm].set(y, unique_indices=True, indices_are_sorted=False)
  return jnp.where(keep, x, jnp.where((valid & finite)[:, None], out, jnp.nan))


# ----------------------------------------------------------------------------
# Host kernel.


def _sort_keys(x: np.ndarray) -> np.ndarray:
  """uint64 keys whose order is the float order of ``x``, index in the low half.

  One SIMD sort of these keys replaces an argsort (several times faster in
  NumPy), and the sorted values decode from the keys without a gather.
  """
  bits = x.view(np.int32)
  # Negative floats: flip every bit; others: flip the sign bit.
  flip = bits >> 31
  flip |= np.int32(-(2**31))
  flip ^= bits
  keys = np.empty(x.shape, dtype=np.uint64)
  halves = keys.view(np.uint32).reshape(*x.shape, 2)  # little-endian: low, high
  halves[..., 0] = np.arange(x.shape[-1], dtype=np.uint32)
  halves[..., 1] = flip.view(np.uint32)
  return keys


def _decode(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  halves = keys.view(np.uint32).reshape(*keys.shape, 2)
  hi = halves[..., 1].view(np.int32)
  flip = hi >> 31
  np.invert(flip, out=flip)
  flip |= np.int32(-(2**31))
  flip ^= hi
  return flip.view(np.float32), halves[..., 0].astype(np.intp)


def prox_rows_host(x: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Prox of ``t · R`` on every row of ``x`` on the host (float64 inside).

  ``x`` is ``(..., d)`` float32 or float64 (other dtypes are read as float32)
  and ``t`` broadcasts to ``x.shape[:-1]``; the result has the dtype of ``x``
  and the row-by-row contract of the module. Uses the C kernel (radix sort +
  pool adjacent violators, one pass each) when it was built, else
  :func:`prox_rows_numpy`.

  Example:
    >>> import numpy as np
    >>> from softshare_jax import isotonic
    >>> isotonic.prox_rows_host(np.array([[0.0, 0.05, 1.0], [1.0, np.inf, 2.0]]), 0.1)
    array([[0.075, 0.075, 0.9  ],
           [  nan,   nan,   nan]])
  """
  if host_kernel is None:
    return prox_rows_numpy(x, t)
  x = _host_array(x)
  t = np.ascontiguousarray(np.broadcast_to(np.asarray(t, dtype=np.float64), x.shape[:-1]))
  out = np.empty_like(x)
  if x.size:
    host_kernel.prox_rows(x, t, x.shape[-1], out, x.dtype == np.float64)
  return out


def _host_array(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  return np.ascontiguousarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)


def prox_rows_numpy(x: np.ndarray, t: np.ndarray) -> np.ndarray:
  """:func:`prox_rows_host` in NumPy/SciPy: the fallback without the C kernel.

  Same contract, row by row. Each row that needs a fit gets its own call of
  SciPy's pool-adjacent-violators (about 10 µs each): stacking rows into one
  call would need lifting each above the last, which costs a row the bits of
  every row below it.

  Example:
    >>> import numpy as np
    >>> from softshare_jax import isotonic
    >>> isotonic.prox_rows_numpy(np.array([[0.0, 0.05, 1.0], [1.0, np.nan, 2.0]]), 0.1)
    array([[0.075, 0.075, 0.9  ],
           [  nan,   nan,   nan]])
  """
  x = _host_array(x)
  shape, d = x.shape, x.shape[-1]
  rows = x.reshape(math.prod(shape[:-1]), d)
  t = np.broadcast_to(np.asarray(t, dtype=np.float64), shape[:-1]).reshape(-1)
  out = np.full_like(rows, np.nan)
  with np.errstate(invalid="ignore"):
    valid = t >= 0
  keep = (t == 0) | (valid & (d == 1))
  out[keep] = rows[keep]
  work = np.flatnonzero(valid & ~keep & np.isfinite(rows).all(axis=1))
  if work.size == 0 or d == 0:
    return out.reshape(shape)
  z, perm = _sort_rows(rows[work])
  spread = z[:, -1] - z[:, 0]
  # One cluster once t >= (max − min)(d − 1)/d (docs/design.md §4.2).
  collapse = t[work] >= spread
  fit = np.repeat(z.mean(axis=1, keepdims=True), d, axis=1)
  fit[spread == 0] = z[spread == 0]  # all-equal rows keep their values
  todo = np.flatnonzero(~collapse)
  if todo.size:
    fit[todo] = _isotonic_rows(z[todo] - (t[work][todo] / (d - 1))[:, None] * np.arange(1 - d, d, 2))
  unsorted = np.empty_like(fit)
  np.put_along_axis(unsorted, perm, fit, axis=1)
  out[work] = unsorted
  return out.reshape(shape)


def _sort_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Each row sorted ascending, in float64, and the permutation that sorts it."""
  if rows.dtype == np.float32:
    keys = _sort_keys(rows)
    keys.sort(axis=-1)
    z, perm = _decode(keys)
    return z.astype(np.float64), perm
  perm = np.argsort(rows, axis=-1, kind="stable")
  return np.take_along_axis(rows, perm, axis=-1), perm


def _isotonic_rows(v: np.ndarray) -> np.ndarray:
  """The non-decreasing fit of every row of ``v`` (finite float64), one row at a time."""
  return np.stack([_sp_optimize.isotonic_regression(row).x for row in v])
