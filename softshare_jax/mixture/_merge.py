"""Merging close components after training (Ullrich et al. 2017, §4.3)."""

from __future__ import annotations

import jax
import numpy as np

from softshare_jax._checks import is_traced
from softshare_jax.mixture._model import check_mixture
from softshare_jax.mixture._model import from_components
from softshare_jax.mixture._model import MAX_LOG_PRECISION
from softshare_jax.mixture._model import Mixture


def _symmetric_kl(mu: np.ndarray, var: np.ndarray) -> np.ndarray:
  """KL(a‖b) + KL(b‖a) for all pairs of 1-D Gaussians, float64 (K, K)."""
  d2 = np.square(mu[:, None] - mu[None, :])
  va, vb = var[:, None], var[None, :]
  return (va + d2) / (2 * vb) + (vb + d2) / (2 * va) - 1.0


def merge_components(mixture: Mixture, threshold: float) -> Mixture:
  """Merges close components (Ullrich et al. 2017, §4.3) until none are close.

  Repeatedly merges the pair (a, b) with the smallest symmetric KL divergence

      D(a, b) = KL(a‖b) + KL(b‖a) = (σ_a² + Δ²)/(2σ_b²) + (σ_b² + Δ²)/(2σ_a²) − 1,  Δ = μ_a − μ_b

  while it is below ``threshold``, matching moments:

      π = π_a + π_b,  μ = (π_a μ_a + π_b μ_b)/π,
      σ² = (π_a(σ_a² + μ_a²) + π_b(σ_b² + μ_b²))/π − μ².

  A merge with the zero component keeps it, with mean 0: it absorbs the other
  and matches the second moment about 0, σ² = (π_a σ_a² + π_b(σ_b² + μ_b²))/π.
  Mass and second moment are conserved by every merge, the first moment by
  free-free merges. Merged parameters are rounded to float32 as they are made,
  so merging the result again with the same threshold changes nothing. The
  free components of the result are in the order of their first members.

  Runs on the host in NumPy float64 (O(K³), K small), after training: not
  under ``jit``.

  Args:
    mixture: a :class:`Mixture` with concrete values.
    threshold: merge while the smallest D is < threshold (>= 0).

  Returns:
    A :class:`Mixture` with at most as many components, same ``has_zero``.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> m = ss.Mixture(jnp.array([1.0, 1.001, 5.0]), jnp.zeros(3), jnp.zeros(3),
    ...                jnp.array(0.0), has_zero=False)
    >>> merged = ss.merge_components(m, 0.01)
    >>> merged.means, merged.weights
    (Array([1.0005, 5.    ], dtype=float32), Array([0.6666667, 0.3333333], dtype=float32))
  """
  check_mixture(mixture)
  if is_traced(threshold):
    raise ValueError("threshold must be a concrete number: merge_components runs on the host, not under jit.")
  if not float(threshold) >= 0:
    raise ValueError(f"threshold must be >= 0, got {threshold!r}.")
  has_zero = mixture.has_zero
  mu = np.asarray(jax.device_get(mixture.means), np.float64)
  gamma = np.asarray(jax.device_get(mixture.log_precisions), np.float32).astype(np.float64)
  pi = np.asarray(jax.device_get(mixture.weights), np.float64)
  pi = pi / pi.sum()
  mu, gamma, pi = list(mu), list(gamma), list(pi)
  while len(mu) > 1:
    var = np.exp(-np.asarray(gamma))
    kl = _symmetric_kl(np.asarray(mu), var)
    kl[np.tril_indices(len(mu))] = np.inf
    a, b = np.unravel_index(np.argmin(kl), kl.shape)  # a < b
    if not kl[a, b] < threshold:
      break
    p = pi[a] + pi[b]
    second = (pi[a] * (var[a] + mu[a] ** 2) + pi[b] * (var[b] + mu[b] ** 2)) / p
    if has_zero and a == 0:
      new_mu = 0.0
    else:
      new_mu = float(np.float32((pi[a] * mu[a] + pi[b] * mu[b]) / p))
    new_var = max(second - new_mu**2, 1e-300)
    mu[a] = new_mu
    gamma[a] = float(np.float32(np.clip(-np.log(new_var), -MAX_LOG_PRECISION, MAX_LOG_PRECISION)))
    pi[a] = p
    del mu[b], gamma[b], pi[b]
  return from_components(np.asarray(mu), np.asarray(gamma), np.asarray(pi), has_zero)
