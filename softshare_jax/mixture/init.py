"""Starting mixtures for given weights: evenly spaced, quantiles or k-means++.

The quantiles (``init="quantile"``) and the median |w| (the zero component's
width) come from exact order statistics found without sorting the weights (an
XLA sort of 3e7 floats takes seconds on a CPU): a radix select in JAX, two
counting passes over the float32 bit patterns, the same code concrete or
under ``jit``; then linear interpolation as ``np.quantile``'s, in float32.
Every pass (those and the min/max/stddev) reads the weights 2^20 at a time,
leaf by leaf, each chunk's float32 values and bit patterns made only for that
chunk: this XLA materializes the operands of reductions and scatters, which
took ~7× the weights' memory on whole arrays, and concatenating the leaves
(or converting them to float32 whole) would cost another copy of them all.
"""

from __future__ import annotations

import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softshare_jax.checks import check_choice
from softshare_jax.checks import check_int
from softshare_jax.checks import check_open_unit
from softshare_jax.checks import is_traced
from softshare_jax.checks import require_key
from softshare_jax.mixture.kmeanspp import kmeans_pp
from softshare_jax.mixture.model import MAX_WEIGHT
from softshare_jax.mixture.model import Mixture
from softshare_jax.mixture.model import usable

INITS = ("range", "quantile", "kmeans++")
# init="kmeans++" seeds and iterates on this many weights drawn uniformly when there are more:
# on all 3.4e7 weights of a large model it took ~50 s on a CPU (k passes to seed, 10 scatters).
KMEANS_SAMPLE = 1 << 16
_INVALID_KEY = 0xFFFFFFFF  # the order key of one NaN bit pattern: above every usable weight's key
_RADIX = 1 << 16  # buckets per pass of the radix select (two passes of 16 bits)
_SELECT_ROWS = 32  # ranks per second pass: at most 32 × 2^16 int32 (8 MiB) of counts
_CHUNK = 1 << 20  # weights per step of a counting pass


def _spacing_stddevs(means: jax.Array, fallback: jax.Array) -> jax.Array:
  """σ_k = half the mean gap from μ_k to its neighbours (sorted means); ``fallback`` for K = 1."""
  k = means.shape[0]
  if k == 1:
    return jnp.reshape(fallback, (1,))
  gaps = jnp.diff(means)
  left = jnp.concatenate([gaps[:1], gaps])
  right = jnp.concatenate([gaps, gaps[-1:]])
  return 0.25 * (left + right)


def quantile_ranks(m: Any, num: Any, den: int) -> tuple[Any, Any, Any]:
  """Ranks and weight of the linear-interpolation quantile ``num/den`` of ``m`` values.

  ``np.quantile``'s ``"linear"`` method: the virtual index (m − 1)·num/den,
  here in exact integer arithmetic (no overflow for den² < 2³¹), gives the
  0-based ranks ``lo`` <= ``hi`` <= lo + 1 of the two order statistics and
  the weight ``t = rem/den`` of the upper one. Works on Python ints, NumPy
  and JAX integer arrays (``num`` may be an array).

  Example:
    >>> quantile_ranks(10, 1, 2)  # the median of 10 values: halfway between ranks 4 and 5
    (4, 5, 0.5)
  """
  last = m - 1
  a, b = last // den, last % den
  lo = a * num + (b * num) // den
  rem = (b * num) % den
  hi = lo + (rem > 0)
  return lo, hi, rem / den


def _lerp(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
  """``np.quantile``'s interpolation between neighbouring order statistics (exact at t = 0 and 1)."""
  d = b - a
  return jnp.where(t >= 0.5, b - d * (1 - t), a + d * t)


def _order_keys(w: jax.Array, valid: jax.Array) -> jax.Array:
  """uint32 keys in the order of the float32 values; unusable weights get :data:`_INVALID_KEY`."""
  bits = jax.lax.bitcast_convert_type(w.astype(jnp.float32), jnp.uint32)
  sign = jnp.uint32(0x80000000)
  keys = jnp.where(bits >= sign, ~bits, bits | sign)
  return jnp.where(valid, keys, jnp.uint32(_INVALID_KEY))


def _from_keys(keys: jax.Array) -> jax.Array:
  sign = jnp.uint32(0x80000000)
  bits = jnp.where(keys >= sign, keys ^ sign, ~keys)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _locate(counts: jax.Array, row: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array]:
  """In row ``row[q]`` of ``counts`` (R × 2^16 bucket counts), the bucket holding 0-based rank ``r[q]``.

  That is the first bucket whose cumulative count exceeds ``r``; returned with
  the count of the buckets before it. Two levels of 256: block totals, then
  inside the rank's block only, so each rank costs O(2^8) after O(R · 2^16),
  with cumulative sums as small triangular products (XLA's CPU cumsum of 2^16
  entries is ~15× slower to run and ~3× slower to compile).
  """
  tri = jnp.triu(jnp.ones((256, 256), jnp.int32))
  blocks = counts.reshape(counts.shape[0], 256, 256)
  cum = jnp.matmul(jnp.sum(blocks, axis=2), tri, preferred_element_type=jnp.int32)[row]  # (Q, 256)
  block = jnp.sum(cum <= r[:, None], axis=1, dtype=jnp.int32)  # a count, not a search: cheap to compile
  base = jnp.where(block > 0, jnp.take_along_axis(cum, jnp.maximum(block - 1, 0)[:, None], 1)[:, 0], 0)
  inner = jnp.matmul(blocks[row, jnp.minimum(block, 255)], tri, preferred_element_type=jnp.int32)  # (Q, 256)
  pos = jnp.sum(inner <= (r - base)[:, None], axis=1, dtype=jnp.int32)
  below = base + jnp.where(pos > 0, jnp.take_along_axis(inner, jnp.maximum(pos - 1, 0)[:, None], 1)[:, 0], 0)
  return block * 256 + pos, below


class _Weights(NamedTuple):
  """Weights read chunk by chunk: ``flat`` then each of the ``big`` leaves.

  ``flat``: 1-D, any real dtype, or None; counts where ``valid`` (None: where usable). ``big``: 1-D
  leaves of at least :data:`_CHUNK` weights, any real dtype; count where usable.
  """
  flat: jax.Array | None
  valid: jax.Array | None
  big: tuple[jax.Array, ...]


def _split_leaves(leaves: list[jax.Array]) -> _Weights:
  """One leaf as it is; of several, those under :data:`_CHUNK` concatenated and the others read in place.

  Concatenating them all would copy the weights (1× their bytes on top of
  the statistics' own); the small ones (a model's biases and norms; all of
  them only when every leaf is small) are copied together so that each does
  not take a mostly empty chunk of every pass.
  """
  if len(leaves) == 1:
    return _Weights(leaves[0], None, ())
  small = [x.astype(jnp.float32) for x in leaves if x.shape[0] < _CHUNK]
  big = tuple(x for x in leaves if x.shape[0] >= _CHUNK)
  return _Weights(jnp.concatenate(small) if small else None, None, big)


def _over_chunks(n: int, step: Any, carry: Any) -> Any:
  """``carry = step(carry, start, length)`` over [0, n) in chunks of :data:`_CHUNK` (a loop, then the rest).

  Chunks keep every temporary at O(_CHUNK) whatever n: this XLA materializes
  the operands of scatters and reductions, so n-sized keys, masks and bucket
  indices took up to ~7× the weights' memory.
  """
  full, rest = divmod(n, _CHUNK)
  if full:
    carry = jax.lax.fori_loop(0, full, lambda i, c: step(c, i * _CHUNK, _CHUNK), carry)
  return step(carry, full * _CHUNK, rest) if rest else carry


def _fold(ws: _Weights, step: Any, carry: Any) -> Any:
  """``carry = step(carry, x, ok)`` over all of ``ws``, chunk by chunk: ``x`` float32, ``ok`` which count.

  The big leaves share one loop over all their chunks, a switch picking each
  chunk's leaf: one loop body however many leaves (a loop per leaf would grow
  the program, and its compile time, with them). A leaf's last chunk ends at
  its end, so it overlaps the one before; the positions read twice are not ok.
  """
  if ws.flat is not None:

    def flat_step(c, start, length):
      x = jax.lax.dynamic_slice_in_dim(ws.flat, start, length).astype(jnp.float32)
      ok = usable(x) if ws.valid is None else jax.lax.dynamic_slice_in_dim(ws.valid, start, length)
      return step(c, x, ok)

    carry = _over_chunks(ws.flat.shape[0], flat_step, carry)
  if ws.big:
    plan = [(j, min(first, x.shape[0] - _CHUNK), first) for j, x in enumerate(ws.big)
            for first in range(0, x.shape[0], _CHUNK)]
    table = np.array([(j, start, first - start) for j, start, first in plan], np.int32)
    branches = [lambda start, x=x: jax.lax.dynamic_slice_in_dim(x, start, _CHUNK).astype(jnp.float32)
                for x in ws.big]

    def big_step(i, c):
      leaf, start, skip = jnp.asarray(table)[i]
      x = jax.lax.switch(leaf, branches, start)
      return step(c, x, usable(x) & (jnp.arange(_CHUNK, dtype=jnp.int32) >= skip))

    carry = jax.lax.fori_loop(0, len(plan), big_step, carry)
  return carry


def _count(ws: _Weights, size: int, index_of: Any, magnitude: bool) -> jax.Array:
  """A histogram of ``index_of(keys)`` over the keys of all weights (indices >= size dropped)."""

  def add(h, x, ok):
    return h.at[index_of(_order_keys(jnp.abs(x) if magnitude else x, ok))].add(1, mode="drop")

  return _fold(ws, add, jnp.zeros((size,), jnp.int32))


def _usable_stats(ws: _Weights) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """min, max, (population) stddev (NaN when no weight is usable) and count of the usable weights."""

  def first(carry, x, ok):
    m, count, lo, hi, total = carry
    return (m + jnp.sum(ok, dtype=jnp.int32), count + jnp.sum(ok, dtype=jnp.float32),
            jnp.minimum(lo, jnp.min(jnp.where(ok, x, jnp.inf))),
            jnp.maximum(hi, jnp.max(jnp.where(ok, x, -jnp.inf))), total + jnp.sum(jnp.where(ok, x, 0.0)))

  zero = jnp.zeros((), jnp.float32)
  m, count, lo, hi, total = _fold(ws, first, (jnp.zeros((), jnp.int32), zero, jnp.float32(jnp.inf),
                                              jnp.float32(-jnp.inf), zero))
  mean = total / count
  second = lambda acc, x, ok: acc + jnp.sum(jnp.where(ok, jnp.square(x - mean), 0.0))  # noqa: E731
  nothing = jnp.where(count > 0, 0.0, jnp.nan)  # as nanmin's NaN when no weight is usable
  return lo + nothing, hi + nothing, jnp.sqrt(_fold(ws, second, zero) / count), m


def _select(ws: _Weights, ranks: jax.Array, magnitude: bool) -> jax.Array:
  """The keys of the given 0-based ranks (exact order statistics): a two-pass radix select, no sort.

  Pass 1 counts the keys per upper 16 bits, which places every rank in one
  bucket; pass 2 counts the lower 16 bits of the keys in those buckets only
  (a table maps a bucket to its row), which places it within. Ranks share a
  row when they share a bucket, so the second pass's counts take at most
  ``_SELECT_ROWS`` × 2^16 int32 per group of ranks, whatever n. Counts add
  up over the leaves: no pass needs the weights in one array.
  """
  high = lambda k: (k >> 16).astype(jnp.int32)  # noqa: E731
  first = _count(ws, _RADIX, high, magnitude).reshape(1, _RADIX)
  out = []
  for g in range(0, ranks.shape[0], _SELECT_ROWS):
    r = ranks[g:g + _SELECT_ROWS]
    rows = r.shape[0]
    bucket, below = _locate(first, jnp.zeros_like(r), r)
    # Ranks in one bucket share a row: whichever of their rows the scatter keeps, all of them read it.
    table = jnp.full((_RADIX,), rows, jnp.int32).at[bucket].set(jnp.arange(rows, dtype=jnp.int32))

    def index(k, table=table):  # row ``rows`` (a bucket without a rank) falls off the end
      return table[high(k)] * _RADIX + (k & jnp.uint32(_RADIX - 1)).astype(jnp.int32)

    counts = _count(ws, rows * _RADIX, index, magnitude).reshape(rows, _RADIX)
    low, _ = _locate(counts, table[bucket], r - below)
    out.append((bucket.astype(jnp.uint32) << 16) | low.astype(jnp.uint32))
  return jnp.concatenate(out)


def order_statistics(w: jax.Array, valid: jax.Array | None, ranks: jax.Array, *,
                     magnitude: bool = False) -> jax.Array:
  """The exact order statistics of the given 0-based ``ranks`` among ``w[valid]``, without a sort.

  ``np.sort(w[valid])[ranks]`` as float32 (of ``|w|`` with ``magnitude``;
  ranks must be below the number of valid weights), found by
  :func:`_select`: two counting passes over the float32 bit patterns,
  traceable, O(n) time, temporaries of O(2^20) whatever n.

  Args:
    w: float32 weights, 1-D.
    valid: bools of ``w``'s shape: which weights count (None: the usable
      ones, finite and at most ``MAX_WEIGHT`` in magnitude).
    ranks: int32 ranks, any order.
    magnitude: rank ``|w|`` instead of ``w``.

  Returns:
    float32 values, one per rank.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([3.0, jnp.nan, -1.0, 2.0, 10.0])
    >>> order_statistics(w, jnp.isfinite(w), jnp.array([0, 3, 1])).tolist()
    [-1.0, 10.0, 2.0]
  """
  return _from_keys(_select(_Weights(w, valid, ()), jnp.asarray(ranks, jnp.int32), magnitude))


def _quantile_terms(ws: _Weights, m: jax.Array, nums: np.ndarray, den: int,
                    magnitude: bool = False) -> tuple[jax.Array, ...]:
  """The two order statistics and the weight of the upper one for each quantile; ``m`` weights count."""
  lo, hi, t = quantile_ranks(m, jnp.asarray(nums, jnp.int32), den)
  both = _from_keys(_select(ws, jnp.clip(jnp.concatenate([lo, hi]), 0), magnitude))
  lower, upper = jnp.split(jnp.where(m > 0, both, jnp.nan), 2)
  return lower, upper, t.astype(jnp.float32)


def quantiles(w: jax.Array, valid: jax.Array | None, nums: np.ndarray, den: int, *,
              magnitude: bool = False) -> jax.Array:
  """The quantiles ``nums/den`` of ``w[valid]`` as ``np.quantile`` (``"linear"``) computes them, without a sort.

  The same exact order statistics (:func:`order_statistics`), interpolated
  in float32 with ``np.quantile``'s formula instead of float64: within 2
  float32 ulps of the larger of the two order statistics. NaN when no weight
  is valid. Traceable; ``den``² must stay below 2³¹.

  Args:
    w: float32 weights, 1-D.
    valid: bools of ``w``'s shape: which weights count (None: the usable ones).
    nums: integer numerators (a NumPy array).
    den: the common denominator.
    magnitude: quantiles of ``|w|`` instead of ``w``.

  Returns:
    float32 quantiles, one per numerator.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> w = jnp.array([3.0, jnp.nan, 1.0, 2.0, 10.0])
    >>> quantiles(w, jnp.isfinite(w), np.array([0, 2, 3]), 4).tolist()  # min, median, 3/4
    [1.0, 2.5, 4.75]
  """
  ws = _Weights(w, valid, ())
  m = _fold(ws, lambda m, x, ok: m + jnp.sum(ok, dtype=jnp.int32), jnp.zeros((), jnp.int32))
  return _lerp(*_quantile_terms(ws, m, nums, den, magnitude))


def _gather(leaves: list[jax.Array], index: jax.Array) -> jax.Array:
  """``concatenate(leaves)[index]`` as float32, without the concatenation (a select per leaf)."""
  if len(leaves) == 1:
    return leaves[0][index].astype(jnp.float32)
  out, offset = jnp.zeros(index.shape, jnp.float32), 0
  for x in leaves:
    n = x.shape[0]
    inside = (index >= offset) & (index < offset + n)
    out = jnp.where(inside, x[jnp.clip(index - offset, 0, n - 1)].astype(jnp.float32), out)
    offset += n
  return out


def _kmeans_start(leaves: list[jax.Array], f: int, key: jax.Array, evenly: jax.Array) -> jax.Array:
  """:func:`kmeans_pp` on all the weights up to :data:`KMEANS_SAMPLE`, else on a uniform sample of that many.

  Drawn with replacement over all positions (the leaves end to end), the unusable ones masked out. A
  sample with no usable weight (possible only when nearly none is) gives ``evenly`` (the "range" means)
  instead: k-means++ on all the weights as a fallback would cost its full-size memory even when not taken.
  """
  n = sum(x.shape[0] for x in leaves)
  if n <= KMEANS_SAMPLE:
    w = jnp.concatenate([x.astype(jnp.float32) for x in leaves])
    return kmeans_pp(w, f, key, usable(w))
  pick_key, seed_key = jax.random.split(key)
  sample = _gather(leaves, jax.random.randint(pick_key, (KMEANS_SAMPLE,), 0, n))
  live = usable(sample)
  return jnp.where(jnp.any(live), kmeans_pp(sample, f, seed_key, live), evenly)


def init_mixture(
    weights: Any,
    num_components: int,
    *,
    zero_component: bool = True,
    zero_weight: float = 0.99,
    init: str = "range",
    key: jax.Array | None = None,
) -> Mixture:
  """A starting mixture for the given (masked) weights.

  The free components (``num_components`` of them) get:

  - ``"range"``: means evenly spaced over [min w, max w];
  - ``"quantile"``: means at the quantiles (k + ½)/F, k = 0..F−1, of the
    weights (the medians of F equal-mass bins; linear interpolation as
    ``np.quantile``, of the same exact order statistics, in float32: within
    2 ulps of the larger of the two);
  - ``"kmeans++"``: k-means++ seeding with ``key``, then 10 Lloyd iterations,
    sorted; on a uniform sample of 2^16 weights (drawn with ``key``) when
    there are more.

  NaN and ±Inf weights are ignored (a diverged weight must not make the
  starting mixture NaN); with no finite weight at all it raises a
  ``ValueError`` naming ``weights``, except under ``jit``, where the check
  cannot run and the mixture is NaN.

  Every init gives the free components equal proportions and a stddev equal to
  half the mean gap to their neighbouring means (the one gap at either end),
  so neighbours meet one σ from each mean (the weights' stddev when F = 1),
  floored at 1e-6. The zero component has mean 0,
  π_0 = ``zero_weight`` and the stddev 1.4826 · median|w| (the median absolute
  deviation about 0: a robust estimate, consistent for Gaussian weights, of the
  spread of the mass of weights near 0, which outliers do not inflate),
  floored at 1e-6.

  Traceable: may run under ``jax.jit`` with static arguments.

  Args:
    weights: an array or a pytree of arrays (their weights pooled, as if
      concatenated; read in place, not copied).
    num_components: F >= 1, the number of FREE components (with a zero
      component the mixture has F + 1).
    zero_component: whether to add the zero component (Ullrich et al.).
    zero_weight: π_0 in (0, 1).
    init: ``"range"``, ``"quantile"`` or ``"kmeans++"``.
    key: a PRNG key, required by ``"kmeans++"``.

  Returns:
    A :class:`Mixture` with float32 leaves.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> m = ss.init_mixture(jnp.array([-1.0, 0.0, 0.1, 1.0]), 3, zero_weight=0.7)
    >>> m.means.tolist(), [round(p, 3) for p in m.weights.tolist()]
    ([0.0, -1.0, 0.0, 1.0], [0.7, 0.1, 0.1, 0.1])
  """
  f = check_init_args(num_components, zero_weight, init, key)
  return initial_mixture(weights, f, zero_component=zero_component, zero_weight=zero_weight, init=init,
                         key=key, name="weights")


def initial_mixture(weights: Any, f: int, *, zero_component: bool, zero_weight: Any, init: str, key: Any,
                    name: str) -> Mixture:
  """:func:`init_mixture` after its argument checks; ``name`` is the weights' name in errors.

  The leaves go to the jitted statistics as they are (no concatenated or float32 copy of them all).
  """
  leaves = jax.tree.leaves(weights)
  if not leaves:
    raise ValueError(f"{name} must be an array or a non-empty pytree of arrays.")
  n = sum(int(np.size(x)) for x in leaves)
  if n == 0:
    raise ValueError(f"{name} must contain at least one weight.")
  mixture, count = _start(tuple(leaves), jnp.asarray(zero_weight, jnp.float32), key, f, bool(zero_component),
                          init)
  if not is_traced(count) and int(count) == 0:
    raise ValueError(f"{name} has no usable value (all {n} are NaN, Inf or above {MAX_WEIGHT:g} in "
                     "magnitude): cannot start a mixture from it.")
  return mixture


def check_init_args(num_components: Any, zero_weight: Any, init: Any, key: Any) -> int:
  """Checks the arguments :func:`init_mixture` and ``mixture_prior`` share; returns F."""
  f = check_int("num_components", num_components)
  check_open_unit("zero_weight", zero_weight)
  if check_choice("init", init, INITS) == "kmeans++":
    require_key("init='kmeans++'", key)
  return f


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _start(leaves: tuple, zero_weight: jax.Array, key: Any, f: int, zero_component: bool,
           init: str) -> tuple[Mixture, jax.Array]:
  """The mixture and the number of usable weights (none: the caller raises when it can)."""
  # Unusable weights are left out of every statistic, chunk by chunk (jnp.nanstd & co. on a NaN-masked
  # copy took ~6x the weights' memory).
  flat = [jnp.ravel(x) for x in leaves if np.size(x)]  # a reshape: no copy
  ws = _split_leaves(flat)
  lo, hi, spread, m = _usable_stats(ws)
  if init == "range":
    means = (lo + hi) / 2 * jnp.ones((1,)) if f == 1 else jnp.linspace(lo, hi, f)
  elif init == "quantile":
    means = _lerp(*_quantile_terms(ws, m, 2 * np.arange(f) + 1, 2 * f))
  else:
    evenly = (lo + hi) / 2 * jnp.ones((1,)) if f == 1 else jnp.linspace(lo, hi, f)
    means = _kmeans_start(flat, f, key, evenly)
  stds = jnp.maximum(_spacing_stddevs(means.astype(jnp.float32), spread), 1e-6)
  log_prec = -2.0 * jnp.log(stds)
  if zero_component:
    median = _lerp(*_quantile_terms(ws, m, np.array([1]), 2, magnitude=True))[0]
    zero_std = jnp.maximum(1.4826 * median, 1e-6)
    log_prec = jnp.concatenate([(-2.0 * jnp.log(zero_std))[None], log_prec])
    zero_logit = jnp.log(zero_weight) - jnp.log1p(-zero_weight)
  else:
    zero_logit = jnp.zeros((), jnp.float32)
  return Mixture(
      free_means=means.astype(jnp.float32),
      log_precisions=log_prec.astype(jnp.float32),
      logits=jnp.zeros((f,), jnp.float32),
      zero_logit=jnp.asarray(zero_logit, jnp.float32),
      has_zero=zero_component,
  ), m
