"""The mixture's sufficient statistics: the one pass over the weights.

Everything that learns the mixture from the weights (the EM step, the
``mixture_prior`` transform's weight and mixture gradients) needs, per
component j, the same sums over the weights i (docs/design.md §4.1):

    N_j = Σ_i r_ij,   S1_j = Σ_i r_ij d_ij,   S2_j = Σ_i r_ij d_ij²,   d_ij = w_i − μ_j

centred on the current means so that the second moment is free of
cancellation. They are computed here and only here, ``chunk`` weights at a
time, so that nothing of size weights × components outlives a chunk.

The pass keeps each leaf's shape (:func:`block_shape`): a block takes an
even share of every axis, so under SPMD sharding each device evaluates its
own weights, the per-weight gradient keeps the params' sharding, and only the
O(K) statistics are summed across devices. The chunk depends on the platform
(:func:`default_chunk`): small on CPU, where cache-sized blocks are fastest;
on GPU/TPU the whole leaf at once while weights × K fits a larger budget.
Many leaves are never joined into one vector (that would gather sharded
ones): each gets its own pass, and the passes run in groups of at most a
chunk of weights, one group after another (:func:`tree_pass`).

A weight the mixture cannot evaluate is left out of every sum and gets no
gradient: NaN or ±Inf, or so far from every component that its log-joint is
−inf for all of them (λ_j d² overflows float32, e.g. w = 1e20). One broken
weight must not make the statistics, hence the mixture, NaN for good.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from softshare_jax.mixture.density import log_joint
from softshare_jax.mixture.model import Mixture
from softshare_jax.mixture.model import usable

# The chunk of the pass is set by a budget of chunk × K elements: the temporaries
# of one chunk are a few (chunk, K) float32 arrays, so memory stays O(budget)
# whatever the weights and K. On CPU a small chunk keeps them in cache and the
# loop costs little; on GPU/TPU a loop step costs more than the memory, so the
# pass runs in one go while weights × K fits the larger budget.
DEFAULT_CHUNK = 2**16
CHUNK_BUDGET = 2**18
ACCELERATOR_BUDGET = 2**26


def default_chunk(num_components: int, platform: str = "cpu") -> int:
  """Weights per chunk for a K-component mixture on ``platform``.

  On CPU at most 2**16, fewer when chunk × K would pass 2**18 (cache-sized
  temporaries); on any other platform chunk × K ≤ 2**26.

  Example:
    >>> default_chunk(64), default_chunk(64, "gpu")
    (4096, 1048576)
  """
  k = max(1, int(num_components))
  if platform == "cpu":
    return max(1, min(DEFAULT_CHUNK, CHUNK_BUDGET // k))
  return max(1, ACCELERATOR_BUDGET // k)


class Statistics(NamedTuple):
  """Per-component sums over the (valid) weights; add two with :func:`add`.

  Attributes:
    count: ``()`` the number of weights summed.
    mass: ``(K,)`` N_j = Σ_i r_ij.
    first: ``(K,)`` Σ_i r_ij (w_i − μ_j).
    second: ``(K,)`` Σ_i r_ij (w_i − μ_j)².
  """

  count: jax.Array
  mass: jax.Array
  first: jax.Array
  second: jax.Array


def zero_statistics(num_components: int) -> Statistics:
  """Statistics of no weights."""
  zeros = jnp.zeros((num_components,), jnp.float32)
  return Statistics(jnp.zeros((), jnp.float32), zeros, zeros, zeros)


def add(a: Statistics, b: Statistics) -> Statistics:
  """The statistics of the union of two sets of weights."""
  return Statistics(*(x + y for x, y in zip(a, b)))


def weight_pass(m: Mixture, w: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, Statistics]:
  """One pass of responsibilities: the weights' gradient and the statistics.

  Returns ``∂/∂w_i [−log p(w_i)] = Σ_j r_ij λ_j d_ij`` (shape of ``w``) and
  the :class:`Statistics` of the usable weights among those where ``valid``
  (all when None). A weight is unusable when it is NaN, ±Inf or above
  ``MAX_WEIGHT`` (1e12) in magnitude, or its
  log-joint is −inf for every component; its gradient is 0 and it is not
  counted. A NaN mixture is not hidden this way: its NaN reaches the output.
  """
  w = jnp.asarray(w, jnp.float32)
  finite = usable(w)
  # The log-joint of a NaN/Inf weight is taken at 0 instead, so that no NaN
  # enters the sums even at responsibility 0 (0 · NaN is NaN).
  w = jnp.where(finite, w, 0.0)
  lj = log_joint(m, w)
  top = jnp.max(lj, axis=-1)
  # ``!= -inf`` rather than ``> -inf``: a NaN log-joint (a NaN mixture) stays
  # "usable", so that the NaN shows in the updates instead of silencing the prior.
  ok = finite & (top != -jnp.inf)
  if valid is not None:
    ok = ok & valid
  # The softmax of jax.nn.softmax, with the normalizer of unusable rows set to
  # inf: their responsibilities are exactly 0 without a select over (n, K).
  e = jnp.exp(lj - jnp.where(ok, top, 0.0)[..., None])
  r = e / jnp.where(ok, jnp.sum(e, axis=-1), jnp.inf)[..., None]
  d = w[..., None] - m.means
  rd = r * d
  grad_w = jnp.sum(rd * m.precisions, axis=-1)
  axes = tuple(range(r.ndim - 1))
  count = jnp.sum(ok, dtype=jnp.float32)
  return grad_w, Statistics(count, jnp.sum(r, axis=axes), jnp.sum(rd, axis=axes), jnp.sum(rd * d, axis=axes))


def block_shape(shape: tuple[int, ...], chunk: int) -> tuple[int, ...] | None:
  """The block of a shape-preserving pass over a leaf of ``shape``: at most ``chunk`` weights.

  Each axis of size s_a is split as (o_a, f_a), s_a = o_a · f_a, and the pass
  visits the f = Π f_a blocks of shape (o_a) that take every f_a-th index
  along each axis. A block keeps an even share of every axis, so whichever
  axes are sharded each device holds the same part of every block, and
  XLA's SPMD partitioner keeps the pass local: only the O(K) statistics
  cross devices, as long as each sharded o_a is a multiple of its number of
  shards. Shard counts being powers of two, the block keeps as many factors
  of two of every axis as it can (up to 2⁶ each), then is as large as it can
  be. None when every block would need more than twice the steps of a flat
  pass (awkward sizes, such as a large prime).

  Example:
    >>> block_shape((2048, 4096), 4096)
    (64, 64)
    >>> block_shape((1000, 4000), 1024)  # 8 | 1000 and 8 | 4000: so do 8 and 80
    (8, 80)
    >>> block_shape((4099,), 1024) is None
    True
  """
  size = math.prod(shape)
  least = -(-size // (2 * -(-size // chunk)))  # the smallest block within twice the flat steps
  # Best block per product, axis by axis, by the factors of two each axis keeps (capped at what it
  # has and at 2⁶), fewest first: the block whose worst-off axis keeps the most.
  best: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {1: ((), ())}
  for s in shape:
    cap = min(_twos(s), _MAX_TWOS)
    grown: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for prod, (kept, block) in best.items():
      for o in _divisors(s):
        if prod * o > chunk:
          break
        cand = (tuple(sorted(kept + (min(_twos(o), cap),) * (cap > 0))), block + (o,))
        if prod * o not in grown or cand[0] > grown[prod * o][0]:
          grown[prod * o] = cand
    best = grown
  fits = [(kept, prod, block) for prod, (kept, block) in best.items() if prod >= least]
  return max(fits)[2] if fits else None


_MAX_TWOS = 6


def _twos(n: int) -> int:
  """The number of factors of two of ``n`` > 0."""
  return (n & -n).bit_length() - 1


def _divisors(n: int) -> list[int]:
  """The divisors of ``n`` >= 1, ascending."""
  small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
  return sorted(set(small + [n // d for d in small]))


def _blocked_pass(m: Mixture, w: jax.Array, block: tuple[int, ...]) -> tuple[jax.Array, Statistics]:
  """:func:`weight_pass` one block of :func:`block_shape` at a time, keeping ``w``'s shape."""
  inner = tuple(s // o for s, o in zip(w.shape, block))
  # Axis a becomes (o_a, f_a): a block is one index of every f_a. Splitting an
  # axis in place (no transpose, no padding) keeps its sharding on o_a.
  split = tuple(x for pair in zip(block, inner) for x in pair)
  ws = w.reshape(split)
  steps = math.prod(inner)

  def starts(t):
    idx = []
    for f in reversed(inner):
      idx.append(t % f)
      t = t // f
    zero = jnp.zeros((), t.dtype)
    return [x for i in reversed(idx) for x in (zero, i)]

  def body(t, carry):
    grad, total = carry
    at = starts(t)
    blk = lax.dynamic_slice(ws, at, tuple(x for o in block for x in (o, 1))).reshape(block)
    g, stats = weight_pass(m, blk)
    grad = lax.dynamic_update_slice(grad, g.reshape(tuple(x for o in block for x in (o, 1))), at)
    return grad, add(total, stats)

  grad, total = lax.fori_loop(0, steps, body, (jnp.zeros_like(ws), zero_statistics(m.num_components)))
  return grad.reshape(w.shape), total


def _flat_pass(m: Mixture, w: jax.Array, chunk: int) -> tuple[jax.Array, Statistics]:
  """:func:`weight_pass` over the flattened leaf padded to whole chunks (any size; not shard-local)."""
  n = int(w.size)
  pad = (-n) % chunk
  blocks = jnp.pad(jnp.ravel(w), (0, pad)).reshape(-1, chunk)
  valid = (jnp.arange(n + pad) < n).reshape(-1, chunk)

  def body(total, xs):
    grad_w, stats = weight_pass(m, *xs)
    return add(total, stats), grad_w

  stats, grads = lax.scan(body, zero_statistics(m.num_components), (blocks, valid))
  return grads.reshape(-1)[:n].reshape(w.shape), stats


def _chunked_pass(m: Mixture, w: jax.Array, chunk: int) -> tuple[jax.Array, Statistics]:
  if w.size <= chunk:
    return weight_pass(m, w)
  block = block_shape(w.shape, chunk)
  return _flat_pass(m, w, chunk) if block is None else _blocked_pass(m, w, block)


def leaf_pass(m: Mixture, w: jax.Array, chunk: int | None = None) -> tuple[jax.Array, Statistics]:
  """:func:`weight_pass` on one leaf, ``chunk`` weights at a time when it is larger.

  ``chunk`` defaults to :func:`default_chunk` of the mixture's K on the
  platform the computation runs on (chosen when it is lowered, with
  ``lax.platform_dependent``). The pass keeps the leaf's shape: it visits
  the blocks of :func:`block_shape`, so under ``jit`` with sharded params
  each device evaluates its own weights and only the statistics are summed
  across devices. A leaf whose shape does not split into blocks (a large
  prime size) is flattened and padded to whole chunks instead, with the
  padding masked out; that path gathers a sharded leaf.

  Example:
    >>> import jax.numpy as jnp
    >>> from softshare_jax.mixture.model import Mixture
    >>> m = Mixture(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.array(0.0), False)  # one N(0, 1)
    >>> grad, stats = leaf_pass(m, jnp.arange(12.0).reshape(3, 4), chunk=4)
    >>> grad[2], stats.count, stats.first
    (Array([ 8.,  9., 10., 11.], dtype=float32), Array(12., dtype=float32), Array([66.], dtype=float32))
  """
  w = jnp.asarray(w, jnp.float32)
  k = m.num_components
  if chunk is not None:
    return _chunked_pass(m, w, int(chunk))
  cpu, other = default_chunk(k, "cpu"), default_chunk(k, "other")
  if w.size <= min(cpu, other):
    return weight_pass(m, w)
  return lax.platform_dependent(m, w, cpu=lambda m, w: _chunked_pass(m, w, cpu),
                                default=lambda m, w: _chunked_pass(m, w, other))


def tree_pass(m: Mixture, leaves: Sequence[jax.Array],
              chunk: int | None = None) -> tuple[list[jax.Array], Statistics]:
  """:func:`leaf_pass` over many leaves: their gradients and the statistics of them all.

  Every leaf gets its own pass in its own shape, so a sharded leaf, small or
  large, is never gathered (joining leaves into one vector would gather
  them); only the O(K) statistics cross devices. The passes run in groups of
  at most ``chunk`` weights (a larger leaf alone, in its blocks), one group
  after another, so the temporaries stay those of one chunk however many
  leaves there are. ``chunk`` defaults as in :func:`leaf_pass`. Under SPMD
  a group waits for the all-reduced statistics of the ones before: one
  all-reduce of O(K) per group (on CPU, K = 17: a group per 15420 weights;
  on GPU/TPU a group holds up to 2**26 / K weights).

  Example:
    >>> import jax.numpy as jnp
    >>> from softshare_jax.mixture.model import Mixture
    >>> m = Mixture(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.array(0.0), False)  # one N(0, 1)
    >>> grads, stats = tree_pass(m, [jnp.ones((2, 2)), jnp.full(3, 2.0)])
    >>> grads[1], stats.count, stats.second
    (Array([2., 2., 2.], dtype=float32), Array(7., dtype=float32), Array([16.], dtype=float32))
  """
  leaves = [jnp.asarray(x, jnp.float32) for x in leaves]
  if chunk is not None:
    return _grouped_passes(m, leaves, int(chunk))
  k = m.num_components
  cpu, other = default_chunk(k, "cpu"), default_chunk(k, "other")
  if sum(x.size for x in leaves) <= min(cpu, other):
    return _grouped_passes(m, leaves, min(cpu, other))
  return lax.platform_dependent(m, leaves, cpu=lambda m, xs: _grouped_passes(m, xs, cpu),
                                default=lambda m, xs: _grouped_passes(m, xs, other))


def _grouped_passes(m: Mixture, leaves: list[jax.Array], chunk: int) -> tuple[list[jax.Array], Statistics]:
  """A :func:`leaf_pass` per leaf; each group of at most ``chunk`` weights waits for the ones before."""
  total = zero_statistics(m.num_components)
  grads = []
  group, after = 0, m
  for x in leaves:
    if group and group + x.size > chunk:
      # Independent passes would be run side by side, each with its own (weights, K)
      # temporaries: 100 leaves of 10**4 weights held 50x the params on CPU. Making the
      # next group's mixture depend on the statistics so far orders the groups.
      after, group = _after(m, total), 0
    grad, stats = leaf_pass(after, x, chunk)
    grads.append(grad)
    total = add(total, stats)
    group += x.size
  return grads, total


def _after(m: Mixture, stats: Statistics) -> Mixture:
  """``m`` itself, but computed from ``stats``: what reads it cannot start before ``stats`` is known."""
  # XLA does not fold 0 · x for floats (NaN · 0 is NaN), and the count is finite: same values.
  zero = 0.0 * stats.count
  return dataclasses.replace(m, free_means=m.free_means + zero.astype(jnp.result_type(m.free_means)),
                             log_precisions=m.log_precisions + zero.astype(jnp.result_type(m.log_precisions)))


def statistics(m: Mixture, w: jax.Array, chunk: int | None = None) -> Statistics:
  """The :class:`Statistics` of a flat weight vector, evaluated in chunks (see :func:`leaf_pass`)."""
  return leaf_pass(m, w, chunk)[1]


def mixture_gradient(m: Mixture, stats: Statistics) -> Mixture:
  """∂/∂(free parameters) of −Σ_i log p(w_i), from the statistics alone.

      ∂/∂μ_j = −λ_j S1_j              ∂/∂γ_j = −½ (N_j − λ_j S2_j)
      ∂/∂η_j = s_j (n − N_0) − N_j    ∂/∂ζ   = n π_0 − N_0

  with s = softmax(η) and n the count; without a zero component N_0 = 0 and
  s = π. The result has the structure of ``m`` (the zero mean is not free).
  """
  lam = m.precisions
  g_mu = -lam * stats.first
  g_gamma = -0.5 * (stats.mass - lam * stats.second)
  if m.has_zero:
    g_logits = jax.nn.softmax(jnp.asarray(m.logits, jnp.float32)) * (stats.count - stats.mass[0]) - stats.mass[1:]
    g_zero = stats.count * m.weights[0] - stats.mass[0]
    g_mu = g_mu[1:]
  else:
    g_logits = m.weights * stats.count - stats.mass
    g_zero = jnp.zeros((), jnp.float32)
  return Mixture(free_means=g_mu, log_precisions=g_gamma, logits=g_logits,
                 zero_logit=jnp.asarray(g_zero, jnp.float32), has_zero=m.has_zero)
