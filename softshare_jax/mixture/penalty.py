"""The mixture prior as a loss term: −log p(w) − log p(mixture), differentiable in both.

For training Nowlan & Hinton's objective (their eq. 4) with a full-batch
line-search optimizer (conjugate gradient, L-BFGS), where the mixture is part
of the optimized pytree instead of the state of an Optax transform. It is the
same penalty as :func:`~softshare_jax.mixture_prior` (docs/design.md §4.1):
the same default mask, zero component, unusable-weight rule and hyper-priors,
so ``jax.grad`` of it gives the weight gradient that the transform adds
(divided by its ``strength``) and the mixture gradient that it feeds its
mixture optimizer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softshare_jax import masks
from softshare_jax.mixture import hyper
from softshare_jax.mixture.density import log_joint
from softshare_jax.mixture.model import check_mixture
from softshare_jax.mixture.model import Mixture
from softshare_jax.mixture.model import usable
from softshare_jax.mixture.statistics import default_chunk


def _block_cost(m: Mixture, w: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """−Σ log p(w) over the usable weights of one block, and their count, Σ w and Σ w²."""
  ok = valid & usable(w)
  # An unusable weight is evaluated at 0 (its cost and gradient are then masked to exactly 0:
  # a NaN would otherwise leak into the gradient through 0 · NaN).
  w = jnp.where(ok, w, 0.0)
  lj = log_joint(m, w)
  top = jax.lax.stop_gradient(jnp.max(lj, axis=-1))
  ok = ok & (top != -jnp.inf)
  lp = jax.nn.logsumexp(jnp.where(ok[..., None], lj, 0.0), axis=-1)
  wk = jax.lax.stop_gradient(jnp.where(ok, w, 0.0))
  return (-jnp.sum(jnp.where(ok, lp, 0.0)), jnp.sum(ok, dtype=jnp.float32), jnp.sum(wk), jnp.sum(wk * wk))


def _leaf_cost(m: Mixture, w: jax.Array, chunk: int) -> tuple[jax.Array, ...]:
  """:func:`_block_cost` of one flattened leaf, ``chunk`` weights at a time when larger.

  Each chunk is rematerialised in the backward pass (``jax.checkpoint``), so
  reverse mode keeps no (#weights × K) array either.
  """
  w = jnp.ravel(jnp.asarray(w, jnp.float32))
  n = int(w.size)
  if n <= chunk:
    return _block_cost(m, w, jnp.ones((n,), bool))
  pad = (-n) % chunk
  blocks = jnp.pad(w, (0, pad)).reshape(-1, chunk)
  valid = (jnp.arange(n + pad) < n).reshape(-1, chunk)
  cost = jax.checkpoint(_block_cost)

  def body(total, xs):
    return tuple(a + b for a, b in zip(total, cost(m, *xs))), None

  zero = jnp.zeros((), jnp.float32)
  out, _ = jax.lax.scan(body, (zero, zero, zero, zero), (blocks, valid))
  return out


def mixture_penalty(params: Any, mixture: Mixture, *, mask: Any = None, precision_prior: Any = None,
                    zero_precision_prior: Any = None, zero_weight_prior: Any = None) -> jax.Array:
  """−Σ_i log p(w_i) − log p(λ) − log p(π_0): the mixture prior's cost as a function.

  The summed negative log density of the masked weights under ``mixture``,

      −Σ_i log Σ_j π_j N(w_i | μ_j, 1/λ_j),

  plus the hyper-priors' cost (up to constants): −(α−1)γ_j + βλ_j per
  component for a Gamma(α, β) precision prior, and −(a−1) log π_0 −
  (b−1) log(1−π_0) for a Beta(a, b) ``zero_weight_prior``. Differentiable in
  ``params`` and in ``mixture`` (all its leaves, the zero component's logit
  included: freeze the leaves you do not want learned, e.g. with
  ``optax.masked``). Nowlan & Hinton's eq. 4 with a mean data loss L reads
  ``L(params) + strength * mixture_penalty(params, mixture)``; with the noise
  level learned as well (their σ_y), add it as a leaf, e.g. ``log_noise``, and
  use ``N/2 · 2 log_noise + Σ (y − d)² / (2 exp(2 log_noise))`` as the data
  term with ``strength = 1``.

  Which weights: ``mask`` as in :func:`~softshare_jax.mixture_prior` (default:
  floating-point leaves with ndim >= 2). A weight the mixture cannot evaluate
  (NaN, ±Inf, above 1e12 in magnitude, or a log-joint of −inf for every
  component) adds 0 and gets a zero gradient, as the transform leaves it out.
  Leaves larger than 2**16 weights (fewer when K > 64) are evaluated in
  chunks, rematerialised in the backward pass, so memory does not grow as
  #weights × K. ``precision_prior="auto"`` is the default of
  :func:`~softshare_jax.mixture_prior`: Gamma(3/2, var(w)/(2K²)) with var(w)
  the (undifferentiated) variance of the masked weights; ``None`` is flat.

  Args:
    params: a pytree of arrays.
    mixture: a :class:`~softshare_jax.Mixture`.
    mask: which leaves (a pytree of bools, a prefix of one, or a callable).
    precision_prior: None, ``"auto"`` or a Gamma prior (α, β) on the free
      precisions, α > 0, β >= 0.
    zero_precision_prior: the same for the zero component's precision.
    zero_weight_prior: None or a Beta prior (a, b) on π_0, a, b > 0.

  Returns:
    A float32 scalar.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> params = {"w": jnp.array([[-1.0, 1.0]]), "b": jnp.zeros(1)}
    >>> m = ss.Mixture(jnp.array([-1.0, 1.0]), jnp.zeros(2), jnp.zeros(2), jnp.array(0.0), False)
    >>> ss.mixture_penalty(params, m).round(4)   # 2 × −log(½ N(0|0,1) + ½ N(2|0,1))
    Array(2.9703, dtype=float32)
    >>> g_params, g_mixture = jax.grad(ss.mixture_penalty, argnums=(0, 1))(params, m)
    >>> g_params["b"]   # not masked: no gradient
    Array([0.], dtype=float32)
  """
  m = check_mixture(mixture)
  pp = hyper.check_precision_prior("precision_prior", precision_prior)
  zp = hyper.check_precision_prior("zero_precision_prior", zero_precision_prior)
  zw = hyper.check_beta_prior("zero_weight_prior", zero_weight_prior)
  leaves = jax.tree.leaves(params)
  on = jax.tree.leaves(masks.resolve_mask(mask, params, masks.is_kernel_leaf))
  chunk = default_chunk(m.num_components)
  zero = jnp.zeros((), jnp.float32)
  cost, count, s1, s2 = zero, zero, zero, zero
  for p, keep in zip(leaves, on):
    if keep and np.size(p):
      c, n, a, b = _leaf_cost(m, p, chunk)
      cost, count, s1, s2 = cost + c, count + n, s1 + a, s2 + b
  if isinstance(pp, str) or isinstance(zp, str):
    n = jnp.maximum(count, 1.0)
    pp, zp = hyper.resolve_precision_priors(m, pp, zp, s2 / n - jnp.square(s1 / n))
  return cost + hyper.hyper_cost(m, pp, zp, zw, zw is not None)
