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
  Its compiled working memory is about 3.3x its input (float32 on CPU, one
  row of 2^20 or 2^23 or 64 rows of 2^14; ``benchmarks/prox_speed.py``
  prints it): the fit is kept as its blocks, one int32 link per element,
  and a block's value is its mean from the prefix sums when it is needed;
  scans and the search update one array in place; the sorted row lives
  only until its prefix sums are taken, and the permutation is sorted for
  again after the fit.
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
from softshare_jax.columns import fresh, put, salted_iota, scan_columns
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

  # Every entry is written: the initial zeros only need to come late (they
  # depend on the block totals), not to hold their place through the sort.
  zeros = jnp.broadcast_to((run[0][..., None] * 0).astype(z.dtype), zp.shape)
  hi, lo, _, _ = _columns(zp, (zeros, zeros, *run), write)
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
    """``i`` and ``j``: index arrays, or functions that compute them anew at
    each use (see :func:`softshare_jax.columns.fresh`)."""
    i, j = (i if callable(i) else lambda i=i: i), (j if callable(j) else lambda j=j: j)
    zs = (_take(self.hi, j()) - _take(self.hi, i())) + (_take(self.lo, j()) - _take(self.lo, i()))
    n = (j() - i()).astype(self.dtype)
    # Σ_{k=i+1..j} (2k − d − 1) = (j − i)(i + j − d): the ramp needs no prefix sum.
    return zs - self.a * n * (i() + j() - self.d).astype(self.dtype)

  def mean(self, i, j):
    n = (j() if callable(j) else j) - (i() if callable(i) else i)
    return self.sum(i, j) / jnp.maximum(n, 1).astype(self.dtype)


# ----------------------------------------------------------------------------
# Blocks as links: one int32 per element describes the whole block structure.
# A block [s, e) holds e at s and s at each of its other members, so that the
# start and end of any element's block are one or two gathers away and its
# fitted value, the mean over the block, comes from the prefix sums. The fit
# itself is never stored: that, and the block starts and ends, would take two
# more arrays of the row's size through every loop.


def _block_chain(links, i):
  """The start and end of the block holding each position ``i``."""
  s = jnp.minimum(_take(links, i), i)  # a start holds its end, which is past it
  return {"i": i, "s": s, "e": _take(links, s)}


def _means(seg: Segments, links: jax.Array) -> jax.Array:
  """The fit: every element's block mean, one exact refit per block (so bit-identical within it)."""
  late = links[0, 0]
  f = fresh(lambda salt: _block_chain(links, salted_iota(links.shape, late + salt)))
  return seg.mean(f("s"), f("e"))


def _low_starts(seg, links, at):
  """Which positions ``at(salt)`` start a block, and which of those start one
  whose mean is below the previous block's (a violation)."""

  def chain(salt):
    i = at(salt)
    prev = jnp.maximum(i - 1, 0)
    return {"i": i, "a": _take(links, i), "start": _take(links, i) > i, "ps": _block_chain(links, prev)["s"]}

  f = fresh(chain)
  return f("start")(), f("start")() & (f("i")() > 0) & (seg.mean(f("ps"), f("i")) > seg.mean(f("i"), f("a")))


def _relink(links, keep):
  """Links of the blocks that start where ``keep`` is True (into ``links``' buffer)."""
  rows, d = keep.shape
  kept = lambda idx: _take(keep, idx) & (idx < d)  # noqa: E731
  # Forward: every element links to the last kept start at or before it.
  links = scan_columns(
      links, lambda idx, _: jnp.where(kept(idx), idx, -1), jnp.maximum, -1,
      lambda out, idx, before, after: put(out, idx, after))
  # Backward: a kept start links to the next one (or d).
  return scan_columns(
      links, lambda idx, _: jnp.where(kept(idx), idx, d), jnp.minimum, d,
      lambda out, idx, before, after: put(out, idx, jnp.where(kept(idx), before, _take(out, idx))),
      reverse=True)


def _pool_links(seg, shape, rounds):
  """Parallel pooling from singletons; returns the links."""

  def cond(carry):
    links, i = carry
    return (i < rounds) & jnp.any(_low_starts(seg, links, lambda salt: salted_iota(shape, 64 * i + salt))[1])

  def body(carry):
    links, i = carry
    start, low = _low_starts(seg, links, lambda salt: salted_iota(shape, 64 * i + salt))
    return _relink(links, start & ~low), i + 1

  # The singletons' links, made after the prefix sums (through a no-op on
  # them): with nothing to wait for, XLA would make them first and hold them
  # through the sort.
  k = salted_iota(shape, (seg.hi[0, 0] != 0).astype(jnp.int32))
  return lax.while_loop(cond, body, (k + 1, jnp.int32(0)))[0]


def _bounded_depth(seg, links, run):
  """Bounded-depth isotonic fit: ceil(log2 d) levels of bridge merges.

  At level l the row is cut into segments of 2^l whose halves are already
  fitted. Their fits are the slopes of the greatest convex minorants (GCM) of
  the halves' cumulative sums; the fit of the segment is the GCM of both,
  which keeps the left hull up to a vertex p, bridges to a right vertex q and
  keeps the right hull after q: only [p, q) changes, to one block. Every left
  vertex finds its tangent q to the right hull by binary search over the
  right half's block starts; the bridge starts at the first vertex p whose
  tangent is not steeper than the hull leaving p. Depth O(log² d) in all,
  work O(d log² d).

  Rows where ``run`` is False keep their ``links``; where it is True, these
  must be the singletons.

  Memory: besides the prefix sums and the links, one array of the row's size
  (the search positions, then the new links), which the search updates in
  place, as the scan by columns does.
  """
  rows, d = links.shape
  levels = max(1, math.ceil(math.log2(d)))
  dtype = seg.dtype

  def geometry(k, level):
    start = jnp.left_shift(jnp.right_shift(k, level), level)
    return start, jnp.minimum(start + jnp.left_shift(1, level - 1), d), jnp.minimum(start + jnp.left_shift(1, level), d)

  def active(level, links, at):
    # The halves' fits violate at mid: the segment of each position at(salt) needs a bridge.
    def chain(salt):
      _, mid, end = geometry(at(salt), level)
      right = jnp.minimum(mid, d - 1)
      return {"mid": mid, "end": end, "s": _block_chain(links, jnp.maximum(mid - 1, 0))["s"], "right": right,
              "e": _take(links, right)}

    f = fresh(chain)
    return run[:, None] & (f("mid")() < f("end")()) & (seg.mean(f("s"), f("mid")) > seg.mean(f("right"), f("e")))

  def slope(k, q):
    # From the left vertex k to the right half's block start q (or its end).
    return seg.sum(k, q) / jnp.maximum(q - k, 1).astype(dtype)

  def level_step(level, links):
    def search(j, pos):
      # Branchless binary search for the last position before the tangent:
      # the test is made at the start of the candidate's block, so that the
      # tangent found is always a block start. The geometry goes through a
      # no-op that depends on j: XLA would hoist what it computes from loop
      # invariants alone out of the loop, as (rows, d) arrays.
      # Each use of a gather computes it anew (columns.fresh). The test is
      # taken in a conditional that always runs: its result is then a boolean
      # array of its own, and the update reads pos only where it writes it,
      # in place (fused with the test, it would go to a new array).
      def chain(salt):
        k = salted_iota(links.shape, 64 * j + salt)
        _, _, end = geometry(k, level)
        cand = jnp.minimum(pos, d + salt) + jnp.left_shift(1, level - 1 - j)
        q = jnp.minimum(cand, end)
        block = _block_chain(links, jnp.minimum(q, d - 1))
        return {"k": k, "end": end, "cand": cand, "past": q >= end, "s": jnp.where(q >= end, end, block["s"]),
                "e": block["e"]}

      def test():
        f = fresh(chain)
        return f("past")() | (seg.mean(f("s"), f("e")) >= seg.mean(f("k"), f("s")))

      touches = lax.cond(j >= 0, test, lambda: jnp.zeros(pos.shape, bool))
      f = fresh(chain)
      return jnp.where((f("cand")() < f("end")()) & ~touches, f("cand")(), pos)

    _, mid, _ = geometry(salted_iota(links.shape, level), level)
    steps = jnp.where(jnp.any(active(level, links, lambda salt: salted_iota(links.shape, 64 * level + salt))), level, 0)
    pos = lax.fori_loop(0, steps, search, mid - 1)

    # First vertex of the bridge per segment, scanned along the row: the
    # state is (start of the latest segment with a bridge vertex, its first
    # vertex p, its tangent q); the later segment wins, the earlier vertex
    # within one. Each element's new link is written over its search position
    # (-1: unchanged).
    def value(idx, pos):
      i = jnp.minimum(idx, d - 1)
      start, mid, end = geometry(i, level)
      a = _take(links, i)
      q = _take(pos, i) + 1
      vertex = (idx < d) & (a > i) & (i < mid) & active(level, links, lambda _: i) & (slope(i, q) <= seg.mean(i, a))
      return jnp.where(vertex, start, -1), i, q

    def later(a, b):
      return jax.tree.map(lambda u, v: jnp.where(b[0] > a[0], v, u), a, b)

    def write(pos, idx, before, after):
      start, p, q = after
      i = jnp.minimum(idx, d - 1)
      merged = (start == geometry(i, level)[0]) & (i < q)
      return put(pos, idx, jnp.where(merged, jnp.where(i == p, q, p), -1))

    pos = scan_columns(pos, value, later, (-1, 0, 0), write)
    return jnp.where(pos >= 0, pos, links)

  top = jnp.where(jnp.any(run), levels + 1, 1)
  return lax.fori_loop(1, top, level_step, links)


def _fit(seg: Segments, shape, rounds: int, whole=None) -> jax.Array:
  """Pooling, then the bounded-depth pass on the rows that pooling left
  unsettled; rows where ``whole`` is True are fitted as one block."""
  links = _pool_links(seg, shape, rounds)
  k = lax.broadcasted_iota(jnp.int32, shape, 1)
  # Row by row: a settled row keeps its pooled blocks whatever the others do.
  run = jnp.any(_low_starts(seg, links, lambda salt: salted_iota(shape, links[0, 0] + salt))[1], axis=1)
  links = jnp.where(run[:, None], k + 1, links)
  links = _bounded_depth(seg, links, run)
  if whole is not None:
    # The one block's mean comes out of the same refit: a mean taken apart
    # would keep the prefix sums alive until it is put in.
    links = jnp.where(whole[:, None], jnp.where(k == 0, shape[1], 0), links)
  return _means(seg, links)


def violations(y: jax.Array, st: jax.Array) -> jax.Array:
  """True at each block start whose fitted value is below the previous block's."""
  k = lax.broadcasted_iota(jnp.int32, y.shape, y.ndim - 1)
  prev = jnp.concatenate([jnp.full_like(y[..., :1], -jnp.inf), y[..., :-1]], axis=-1)
  return (st == k) & (prev > y)


def pool(seg: Segments, v: jax.Array, rounds: int) -> tuple[jax.Array, jax.Array]:
  """Parallel pooling: every run of adjacent violating blocks merges at once.

  Runs at most ``rounds`` rounds (fewer when no violation is left) from the
  singleton blocks of ``v`` (whose values are taken from ``seg``: ``v`` gives
  the shape); returns the fit and each element's block start.
  """
  links = _pool_links(seg, v.shape, rounds)
  k = lax.broadcasted_iota(jnp.int32, v.shape, 1)
  return _means(seg, links), jnp.where(links > k, k, links)


def ramp(d: int, a: jax.Array) -> jax.Array:
  """``(rows, d)`` c_k = a (2k − d − 1), k = 1..d: what the prox subtracts from the sorted row."""
  k = jnp.arange(1, d + 1, dtype=a.dtype)
  return a[:, None] * (2.0 * k - (d + 1))


def isotonic_fit_sorted(z: jax.Array, a: jax.Array, *, rounds: int = POOLING_ROUNDS) -> jax.Array:
  """Non-decreasing least-squares fit of ``z − a(2k − d − 1)`` per row.

  Args:
    z: ``(rows, d)`` float32 (or float64), each row sorted ascending.
    a: ``(rows,)`` ramp slope, ``t / (d − 1)``, in the dtype of ``z``.
    rounds: pooling rounds tried before the bounded-depth pass.

  Returns:
    The fit, ``(rows, d)`` in the dtype of ``z``.
  """
  return _fit(Segments(z, a), z.shape, rounds)


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
  # only until its prefix sums are taken. That later sort takes x itself:
  # rows that hold a NaN or an infinity are answered NaN whatever they
  # compute, and every step of the fit keeps rows apart.
  xf = jnp.where(finite[:, None], x, 0)
  z = lax.sort(xf, dimension=1)
  # Reductions of x, not the ends of z: XLA fuses a slice of z into the last
  # select, which keeps the whole sorted row alive to the end.
  spread = jnp.max(xf, axis=1) - jnp.min(xf, axis=1)
  collapse = t >= spread * _COLLAPSE
  # Rows answered without the fit run it with t = 0, which settles at once.
  a = jnp.where(valid & ~collapse, t, 0) / (d - 1)
  seg = Segments(z, a)
  y = _fit(seg, x.shape, POOLING_ROUNDS, whole=collapse)
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
