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
  Its compiled working memory is about 7x its input (one float32 row of
  2^20 or 2^23 on CPU; ``benchmarks/prox_speed.py`` prints it): the prefix
  sums are built a column at a time in place, and neither the permutation
  nor the sorted row is kept through the fit (both are sorted for again).
* :func:`prox_rows_host` (in :mod:`softshare_jax.isotonic_host`, re-exported
  here) runs on the host in float64: a small C kernel (LSD
  radix sort of the float keys with their indices, 3 passes for float32, then
  linear-time pool adjacent violators) built at install time, or,
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
from jax import lax

# The host kernels live in their own module; they are part of this module's API.
from softshare_jax.isotonic_host import host_kernel  # noqa: F401
from softshare_jax.isotonic_host import prox_rows_host  # noqa: F401
from softshare_jax.isotonic_host import prox_rows_numpy  # noqa: F401

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


def _columns(zp, init, body):
  """Runs ``body(j, column j of zp, carry)`` over the last axis of ``zp``, one column at a time."""
  return lax.fori_loop(
      0, zp.shape[-1], lambda j, c: body(j, lax.dynamic_index_in_dim(zp, j, zp.ndim - 1, keepdims=False), c), init
  )


def prefix_sums(z: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Exclusive double-float prefix sums of ``z`` along its last axis.

  Returns ``(hi, lo)`` of shape ``(..., n)`` for some ``n > d`` with
  ``hi[..., 0] == 0`` and ``hi[..., k] + lo[..., k] ≈ Σ_{j<min(k, d)} z[..., j]``
  to about 2⁻⁴⁸ relative. Two levels over blocks of 128: the block totals,
  their scan across blocks, then the sums within each block from its offset.
  Memory: the block levels run one column at a time and write in place (a
  log-depth scan of the whole row would keep a (hi, lo) pair alive per pass),
  and the padding makes room for index d, so that no copy of the result is
  needed.
  """
  d = z.shape[-1]
  nb = d // _BLOCK + 1  # at least one padding entry, which holds the total
  zp = jnp.pad(z, [(0, 0)] * (z.ndim - 1) + [(0, nb * _BLOCK - d)])
  zp = zp.reshape(*z.shape[:-1], nb, _BLOCK)
  zero = jnp.zeros(zp.shape[:-1], z.dtype)

  def add(j, col, run):
    return _df_add(run, (col, jnp.zeros_like(col)))

  bh, bl = _inclusive_scan(*_columns(zp, (zero, zero), add))
  run = (_shift_right(bh, 1), _shift_right(bl, 1))

  def write(j, col, carry):
    hi, lo, rh, rl = carry
    hi = lax.dynamic_update_index_in_dim(hi, rh, j, zp.ndim - 1)
    lo = lax.dynamic_update_index_in_dim(lo, rl, j, zp.ndim - 1)
    return (hi, lo, *_df_add((rh, rl), (col, jnp.zeros_like(col))))

  hi, lo, _, _ = _columns(zp, (jnp.zeros_like(zp), jnp.zeros_like(zp), *run), write)
  return hi.reshape(*z.shape[:-1], nb * _BLOCK), lo.reshape(*z.shape[:-1], nb * _BLOCK)


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

  def cond(carry):
    y, st, i = carry
    return (i < rounds) & jnp.any(violations(y, st))

  def body(carry):
    # The iota is made here, not closed over: a (rows, d) constant from
    # outside would be carried through the loop as one more array.
    y, st, i = carry
    k = lax.broadcasted_iota(jnp.int32, v.shape, v.ndim - 1)
    keep = (st == k) & ~violations(y, st)
    st, y = _refit(seg, keep)
    return y, st, i + 1

  k = lax.broadcasted_iota(jnp.int32, v.shape, v.ndim - 1)
  y, st, _ = lax.while_loop(cond, body, (v, k, jnp.int32(0)))
  return y, st


def _divide_and_conquer(seg, v, st=None, run=None):
  """Bounded-depth isotonic fit: ceil(log2 d) levels of bridge merges.

  At level l the row is cut into segments of 2^l whose halves are already
  fitted. Their fits are the slopes of the greatest convex minorants (GCM) of
  the halves' cumulative sums; the fit of the segment is the GCM of both,
  which keeps the left hull up to a vertex p, bridges to a right vertex q and
  keeps the right hull after q: only [p, q) changes, to one block. Every left
  element p finds its tangent q(p) to the right hull by binary search; the
  bridge starts at the first p whose tangent is not steeper than the hull
  leaving p. Depth O(log² d) in all, work O(d log² d).

  With ``st`` and ``run`` given, the fit ``(v, st)`` is kept as it is where
  ``run`` is False (only its blocks are refitted) and ``st`` must then be the
  singletons where it is True.

  Memory: the loops carry only the fit (y, st) and the search position; the
  segment geometry is recomputed from an iota wherever it is used, so that no
  loop keeps a (rows, d) array of it alive.
  """
  d = v.shape[1]
  levels = max(1, math.ceil(math.log2(d)))

  def geometry(level):
    k = lax.broadcasted_iota(jnp.int32, v.shape, 1)
    start = jnp.left_shift(jnp.right_shift(k, level), level)
    mid = jnp.minimum(start + jnp.left_shift(1, level - 1), d)
    end = jnp.minimum(start + jnp.left_shift(1, level), d)
    return k, start, mid, end

  def height(y, st, own, end, q):
    # H(q) − H(own): the right half's hull at q above a block start `own`
    # (the block start of k, or of the bridge's first element).
    at_end = q >= end
    qc = jnp.minimum(q, d - 1)
    stq = jnp.where(at_end, end, _take(st, qc))
    return seg.sum(own, stq) + jnp.where(at_end, 0.0, (q - stq).astype(v.dtype) * _take(y, qc))

  def slope(y, st, own, k, end, q):
    offset = (k - own).astype(v.dtype) * y
    return (height(y, st, own, end, q) - offset) / jnp.maximum(q - k, 1).astype(v.dtype)

  def level_step(level, carry):
    y, st = carry
    _, _, mid, end = geometry(level)
    last = jnp.minimum(mid, d - 1)
    active = (mid < end) & (_take(y, mid - 1) > _take(y, last))

    def merge(carry):
      y, st = carry

      def search(j, pos):
        # Branchless binary search for the first q in [mid, end] that touches
        # the right hull: only the position is carried, the steps halve.
        k, _, _, end = geometry(level)
        # st, end and k through a no-op that depends on j: XLA would hoist
        # everything computed from them alone out of the loop and keep it
        # alive as (rows, d) arrays; recomputing it is cheaper than memory.
        st_j, end_j, k_j = (jnp.minimum(a, d + j) for a in (st, end, k))
        cand = pos + jnp.left_shift(1, level - 1 - j)
        q = jnp.minimum(cand, end_j)
        touches = (q >= end_j) | (_take(y, jnp.minimum(q, d - 1)) >= slope(y, st, st_j, k_j, end_j, q))
        return jnp.where((cand < end) & ~touches, cand, pos)

      pos = lax.fori_loop(0, level, search, geometry(level)[2] - 1)
      k, start, mid, end = geometry(level)
      q = pos + 1
      last = jnp.minimum(mid, d - 1)
      active = (mid < end) & (_take(y, mid - 1) > _take(y, last))
      bridge = (k < mid) & active & (slope(y, st, st, k, end, q) <= y)
      # The bridge's first element per segment, by a suffix minimum that
      # doubles its reach each step within the aligned segment: one (rows, d)
      # array in flight, where a segment_min would scatter to a fresh one
      # through materialized indices and gather back.
      def reach(j, f):
        kk = lax.broadcasted_iota(jnp.int32, v.shape, 1)
        far = kk + jnp.left_shift(1, j)
        inside = (far < d) & (jnp.right_shift(far, level) == jnp.right_shift(kk, level))
        return jnp.where(inside, jnp.minimum(f, _take(f, jnp.minimum(far, d - 1))), f)

      f = lax.fori_loop(0, level, reach, jnp.where(bridge, k, d))

      def bridge_block(salt):
        # The bridge's block, from its first element p alone: gathers from
        # st, the search position and the prefix sums. The salt (always 0)
        # differs per use, so that XLA recomputes these gathers inside each
        # fusion below instead of keeping them as (rows, d) arrays. A bridge
        # exists only in an active segment, so `active` is not needed here.
        first = jnp.minimum(_take(f, jnp.minimum(start, d + salt)), d - 1)
        p_start, p_q = _take(st, first), _take(pos, first) + 1
        return (first < mid) & (k >= p_start) & (k < end) & (st < p_q), p_start, p_q

      merged, p_start, p_q = bridge_block(0)
      p_mean = height(y, st, p_start, end, p_q) / jnp.maximum(p_q - p_start, 1).astype(v.dtype)
      y = jnp.where(merged, p_mean, y)
      # The new starts after the new fit (the salt depends on it), so that the
      # old fit is dead by then.
      merged, p_start, _ = bridge_block((y[:, :1] != y[:, :1]).astype(jnp.int32))
      return y, jnp.where(merged, p_start, st)

    return lax.cond(jnp.any(active), merge, lambda c: c, (y, st))

  k = lax.broadcasted_iota(jnp.int32, v.shape, 1)
  top = levels + 1 if run is None else jnp.where(run, levels + 1, 1)
  y, st = lax.fori_loop(1, top, level_step, (v, k if st is None else st))
  # One exact refit per block makes every member of a block bit-identical.
  _, y = _refit(seg, st == k)
  return y


def ramp(d: int, a: jax.Array) -> jax.Array:
  """``(rows, d)`` c_k = a (2k − d − 1), k = 1..d: what the prox subtracts from the sorted row."""
  k = jnp.arange(1, d + 1, dtype=a.dtype)
  return a[:, None] * (2.0 * k - (d + 1))


def _fit(seg: Segments, v: jax.Array, rounds: int, again=None) -> jax.Array:
  """Pooling, then the bounded-depth pass from ``v`` (or from ``again()``, which
  recomputes it, so that ``v`` need not stay alive through the pooling)."""
  y, st = pool(seg, v, rounds)
  done = ~jnp.any(violations(y, st))
  # No conditional around the bounded-depth pass: its operand, the pooled
  # fit, would stay alive through the whole pass. The pass runs no level when
  # the pooling settled, and starts from the singletons of v otherwise.
  y = lax.cond(done, lambda: y, (lambda: v) if again is None else again)
  st = jnp.where(done, st, lax.broadcasted_iota(jnp.int32, v.shape, 1))
  return _divide_and_conquer(seg, y, st, ~done)


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
  # Memory (docs/design.md §6): the permutation is not kept through the fit
  # but found again by a second sort at the end, and the sorted row lives
  # only until its prefix sums and the pooling's first iterate are taken (the
  # bounded-depth pass sorts again). Those later sorts take x itself: rows
  # that hold a NaN or an infinity are answered NaN whatever they compute, and
  # every step of the fit keeps rows apart.
  xf = jnp.where(finite[:, None], x, 0)
  z = lax.sort(xf, dimension=1)
  # Reductions of x, not the ends of z: XLA fuses a slice of z into the last
  # select, which keeps the whole sorted row alive to the end.
  spread = jnp.max(xf, axis=1) - jnp.min(xf, axis=1)
  collapse = t >= spread * _COLLAPSE
  # Rows answered without the fit run it with t = 0, which settles at once.
  a = jnp.where(valid & ~collapse, t, 0) / (d - 1)
  seg = Segments(z, a)
  y = _fit(seg, z - ramp(d, a), POOLING_ROUNDS, lambda: lax.sort(x, dimension=1) - ramp(d, a))
  ends = (jnp.zeros((rows, 1), jnp.int32), jnp.full((rows, 1), d, jnp.int32))
  y = jnp.where(collapse[:, None], seg.mean(*ends), y)
  # The sort for the permutation must come after the fit: scheduled first (as
  # XLA does, optimization barriers are gone by scheduling), it keeps the
  # permutation alive through the whole fit. Its indices depend on y through
  # a no-op XLA cannot see through. The scatter writes every entry, so it
  # goes into the sorted keys, dead by then, rather than into a fresh buffer.
  late = (y[:, :1] != y[:, :1]).astype(jnp.int32)
  iota = jnp.minimum(lax.broadcasted_iota(jnp.int32, x.shape, 1), d + late)
  keys, perm = lax.sort((x, iota), dimension=1, num_keys=1)
  if x.size < 2**31:
    # One flat index per element: a (row, column) pair takes twice the memory.
    flat = (perm + lax.broadcasted_iota(jnp.int32, x.shape, 0) * d).ravel()
    out = keys.ravel().at[flat].set(y.ravel(), unique_indices=True).reshape(x.shape)
  else:
    r = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    out = keys.at[r, perm].set(y, unique_indices=True, indices_are_sorted=False)
  # All-equal rows keep their values: d · z / d need not round back to z.
  out = jnp.where((spread == 0)[:, None], x, out)
  return jnp.where(keep, x, jnp.where((valid & finite)[:, None], out, jnp.nan))
