"""Merging close components after training (Ullrich et al. 2017, §4.3)."""

from __future__ import annotations

import jax
import numpy as np

from softshare_jax.checks import is_traced
from softshare_jax.mixture.model import check_finite_mixture
from softshare_jax.mixture.model import from_components
from softshare_jax.mixture.model import MAX_LOG_PRECISION
from softshare_jax.mixture.model import Mixture


# (rows × K) float64 divergences evaluated at once when rows' nearest pairs are
# recomputed: 8 MiB, whatever K.
_ROW_BUDGET = 1 << 20


def _symmetric_kl(mu_a: np.ndarray, var_a: np.ndarray, mu_b: np.ndarray, var_b: np.ndarray) -> np.ndarray:
  """KL(a‖b) + KL(b‖a) of 1-D Gaussians, broadcast, float64. Symmetric to the last bit."""
  d2 = np.square(mu_a - mu_b)
  return (var_a + d2) / (2 * var_b) + (var_b + d2) / (2 * var_a) - 1.0


class _NearestPairs:
  """For every live component i, its nearest live partner j > i: ``best[i] = D(i, j)``, ``arg[i] = j``.

  The smallest D over all pairs is then ``min(best)``, O(K) to find; a merge
  changes one component and removes another, so only the rows that pointed to
  either, and the merged row, are recomputed (O(K) each). Ties go to the
  smallest i, then the smallest j: the first minimum of the upper triangle in
  row-major order, as ``np.argmin`` of the full matrix would pick.
  """

  def __init__(self, mu: np.ndarray, var: np.ndarray):
    self.mu, self.var = mu, var
    k = mu.size
    self.alive = np.ones(k, bool)
    self.best = np.full(k, np.inf)
    self.arg = np.zeros(k, np.int64)
    self.refresh(np.arange(k))

  def refresh(self, rows: np.ndarray) -> None:
    """Recomputes ``best``/``arg`` of ``rows`` (sorted) over all live columns, in bounded blocks."""
    if rows.size == 0:
      return
    cols = np.flatnonzero(self.alive[rows[0] + 1:]) + rows[0] + 1  # only j > i counts
    step = max(1, _ROW_BUDGET // max(cols.size, 1))
    for s in range(0, rows.size, step):
      r = rows[s:s + step]
      if cols.size == 0:
        self.best[r] = np.inf
        continue
      kl = _symmetric_kl(self.mu[r, None], self.var[r, None], self.mu[None, cols], self.var[None, cols])
      kl[cols[None, :] <= r[:, None]] = np.inf
      j = np.argmin(kl, axis=1)
      self.best[r] = kl[np.arange(r.size), j]
      self.arg[r] = cols[j]

  def closest(self) -> tuple[int, int, float]:
    a = int(np.argmin(self.best))
    return a, int(self.arg[a]), float(self.best[a])

  def merged(self, a: int, b: int) -> None:
    """Component ``a`` has changed (mu/var already updated) and ``b`` > a is gone."""
    self.alive[b] = False
    self.best[b] = np.inf
    lower = np.flatnonzero(self.alive[:a])
    v = _symmetric_kl(self.mu[lower], self.var[lower], self.mu[a], self.var[a])
    old_arg, old_best = self.arg[lower], self.best[lower]
    stale = (old_arg == a) | (old_arg == b)
    better = ~stale & ((v < old_best) | ((v == old_best) & (a < old_arg)))
    self.best[lower[better]] = v[better]
    self.arg[lower[better]] = a
    mid = np.flatnonzero(self.alive[a + 1:b]) + a + 1
    self.refresh(np.concatenate([lower[stale], [a], mid[self.arg[mid] == b]]).astype(np.int64))


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

  Runs on the host in NumPy float64, after training: not under ``jit``.
  Each component's nearest partner is kept and only the rows a merge touches
  are recomputed: the same merges as recomputing every divergence, but a
  merge costs O(K) typically (O(K²) at worst) and memory is O(K) plus a few
  blocks of 2**20 divergences (8 MiB each), never a K × K matrix. A mixture
  with a NaN or Inf parameter is rejected with a ``ValueError``.

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
  check_finite_mixture(mixture)
  if is_traced(threshold):
    raise ValueError("threshold must be a concrete number: merge_components runs on the host, not under jit.")
  if not float(threshold) >= 0:
    raise ValueError(f"threshold must be >= 0, got {threshold!r}.")
  has_zero = mixture.has_zero
  mu = np.asarray(jax.device_get(mixture.means), np.float64)
  gamma = np.asarray(jax.device_get(mixture.log_precisions), np.float32).astype(np.float64)
  pi = np.asarray(jax.device_get(mixture.weights), np.float64)
  pi = pi / pi.sum()
  var = np.exp(-gamma)
  pairs = _NearestPairs(mu, var)
  for _ in range(mu.size - 1):
    a, b, d = pairs.closest()  # a < b
    if not d < threshold:
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
    var[a:a + 1] = np.exp(-gamma[a:a + 1])  # an array exp, as before: the same bits whatever the length
    pairs.merged(a, b)
  keep = pairs.alive
  return from_components(mu[keep], gamma[keep], pi[keep], has_zero)
