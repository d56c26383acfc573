"""The mixture's sufficient statistics: the one pass over the weights.

Everything that learns the mixture from the weights (the EM step, the
``mixture_prior`` transform's weight and mixture gradients) needs, per
component j, the same sums over the weights i (docs/design.md §4.1):

    N_j = Σ_i r_ij,   S1_j = Σ_i r_ij d_ij,   S2_j = Σ_i r_ij d_ij²,   d_ij = w_i − μ_j

centred on the current means so that the second moment is free of
cancellation. They are computed here and only here, ``chunk`` weights at a
time, so that nothing of size weights × components outlives a chunk.

A weight the mixture cannot evaluate is left out of every sum and gets no
gradient: NaN or ±Inf, or so far from every component that its log-joint is
−inf for all of them (λ_j d² overflows float32, e.g. w = 1e20). One broken
weight must not make the statistics, hence the mixture, NaN for good.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from softshare_jax.mixture.density import log_joint
from softshare_jax.mixture.model import Mixture
from softshare_jax.mixture.model import usable

# Weights per chunk at most (small mixtures), and the budget of chunk × K
# elements per chunk: the temporaries of one chunk are a few (chunk, K) float32
# arrays, so memory stays O(CHUNK_BUDGET) whatever the weights and K.
DEFAULT_CHUNK = 2**16
CHUNK_BUDGET = 2**22


def default_chunk(num_components: int) -> int:
  """Weights per chunk for a K-component mixture: 2**16, fewer when K > 64 (chunk × K ≤ 2**22)."""
  return max(1, min(DEFAULT_CHUNK, CHUNK_BUDGET // max(1, int(num_components))))


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


def leaf_pass(m: Mixture, w: jax.Array, chunk: int | None = None) -> tuple[jax.Array, Statistics]:
  """:func:`weight_pass` on one leaf, ``chunk`` weights at a time when it is larger.

  ``chunk`` defaults to :func:`default_chunk` of the mixture's K. The leaf is
  flattened and padded to whole chunks; padding is masked out of the
  statistics and cut from the gradient.
  """
  w = jnp.asarray(w, jnp.float32)
  n = int(w.size)
  if chunk is None:
    chunk = default_chunk(m.num_components)
  if n <= chunk:
    return weight_pass(m, w)
  pad = (-n) % chunk
  blocks = jnp.pad(jnp.ravel(w), (0, pad)).reshape(-1, chunk)
  valid = (jnp.arange(n + pad) < n).reshape(-1, chunk)

  def body(total, xs):
    grad_w, stats = weight_pass(m, *xs)
    return add(total, stats), grad_w

  stats, grads = lax.scan(body, zero_statistics(m.num_components), (blocks, valid))
  return grads.reshape(-1)[:n].reshape(w.shape), stats


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
