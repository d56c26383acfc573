"""Log-densities and responsibilities of a :class:`Mixture`, in log space and float32."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from softshare_jax.mixture.model import check_mixture
from softshare_jax.mixture.model import Mixture

_LOG_2PI = math.log(2.0 * math.pi)


def log_joint(mixture: Mixture, w: jax.Array) -> jax.Array:
  """log π_j + log N(w | μ_j, 1/λ_j), shape ``w.shape + (K,)``, float32.

  The one place the per-component log-density is written; everything that
  needs responsibilities or densities starts here.
  """
  w = jnp.asarray(w).astype(jnp.float32)[..., None]
  gamma = jnp.asarray(mixture.log_precisions, jnp.float32)
  lam = jnp.exp(gamma)
  return mixture.log_weights + 0.5 * gamma - 0.5 * _LOG_2PI - 0.5 * lam * jnp.square(w - mixture.means)


@jax.jit
def _log_prob(mixture: Mixture, w: jax.Array) -> jax.Array:
  return jax.nn.logsumexp(log_joint(mixture, w), axis=-1)


@jax.jit
def _responsibilities(mixture: Mixture, w: jax.Array) -> jax.Array:
  return jax.nn.softmax(log_joint(mixture, w), axis=-1)


def mixture_log_prob(mixture: Mixture, w: jax.Array) -> jax.Array:
  """Elementwise log p(w) under the mixture, in float32.

      log p(w) = logsumexp_j [log π_j + ½γ_j − ½ log 2π − ½ λ_j (w − μ_j)²]

  Computed in log space and in float32 even for bf16/f16 ``w``, so weights of
  ±1e3, precisions up to 1e8 and components with π_j → 0 stay finite.
  Differentiable in ``w`` and in the mixture: ∂/∂w_i [−log p(w_i)] =
  Σ_j r_ij λ_j (w_i − μ_j). Memory is ``w.size × K``: chunk a large leaf.

  Args:
    mixture: a :class:`Mixture`.
    w: an array of weights, any shape.

  Returns:
    A float32 array with the shape of ``w``.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> m = ss.Mixture(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.array(0.0), False)
    >>> ss.mixture_log_prob(m, jnp.array([0.0, 1.0]))  # one N(0, 1)
    Array([-0.9189385, -1.4189385], dtype=float32)
  """
  return _log_prob(check_mixture(mixture), jnp.asarray(w))


def responsibilities(mixture: Mixture, w: jax.Array) -> jax.Array:
  """r_ij = π_j N(w_i|μ_j, 1/λ_j) / Σ_k π_k N(w_i|μ_k, 1/λ_k), in float32.

  A softmax over components of the log joint (log space, like
  :func:`mixture_log_prob`).

  Args:
    mixture: a :class:`Mixture`.
    w: an array of weights, any shape.

  Returns:
    A float32 array of shape ``w.shape + (K,)`` whose last axis sums to 1.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> m = ss.Mixture(jnp.array([1.0]), jnp.zeros(2), jnp.zeros(1), jnp.array(0.0), True)
    >>> ss.responsibilities(m, jnp.array([0.5]))  # halfway: equal
    Array([[0.5, 0.5]], dtype=float32)
  """
  return _responsibilities(check_mixture(mixture), jnp.asarray(w))
