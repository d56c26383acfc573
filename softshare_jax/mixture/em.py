"""The closed-form EM step of the mixture, from its sufficient statistics."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from softshare_jax.checks import is_traced
from softshare_jax.mixture.hyper import check_gamma_prior
from softshare_jax.mixture.hyper import PrecisionPriors
from softshare_jax.mixture.model import check_mixture
from softshare_jax.mixture.model import flat_weights
from softshare_jax.mixture.model import MAX_LOG_PRECISION
from softshare_jax.mixture.model import Mixture
from softshare_jax.mixture.model import TINY
from softshare_jax.mixture.statistics import statistics
from softshare_jax.mixture.statistics import Statistics

# A component whose total responsibility N_j is below this has lost its mass:
# the M-step leaves it as it was instead of dividing by ~0.
_DEAD_MASS = 1e-6


def em_step(
    mixture: Mixture,
    w: Any,
    *,
    precision_prior: tuple[float, float] | None = None,
    zero_precision_prior: tuple[float, float] | None = None,
    damping: float = 0.0,
    learn_zero_weight: bool = False,
) -> Mixture:
  """One EM step: responsibilities at ``mixture``, then the closed-form M-step.

  With r_ij = :func:`responsibilities` and N_j = Σ_i r_ij:

      μ_j = Σ_i r_ij w_i / N_j                  (μ_0 = 0 stays)
      λ_j = (N_j/2 + α − 1) / (½ Σ_i r_ij (w_i − μ_j)² + β)
      π_j ∝ N_j

  λ_j uses the new μ_j and is the MAP estimate under a Gamma(α, β) prior
  (α = 1, β = 0, the maximum-likelihood estimate, without one); the numerator
  and denominator are floored at 1e-30 and γ = log λ is clipped to ±60, so no
  NaN/Inf. The zero component's proportion stays fixed unless
  ``learn_zero_weight``; the others share what remains in proportion to N_j.
  A component with N_j < 1e-6 (it has lost its mass) keeps its old mean,
  precision and proportion. Damping d blends every quantity with its old
  value, new = d·old + (1 − d)·closed form, in the means, log-precisions and
  proportions. The statistics are summed in chunks with chunk × K ≤ 2^18 on CPU
  (2^26 on GPU/TPU; ``statistics.default_chunk``), so memory is bounded
  whatever the number of weights and components.

  Weights the mixture cannot evaluate are ignored: NaN, ±Inf, and weights so
  far from every component that their log-joint is −inf for all of them
  (λ_j (w − μ_j)² overflows float32). When none is left it raises a
  ``ValueError`` naming ``w`` (under ``jit``, where it cannot raise, every
  component has lost its mass and keeps its mean, precision and proportion).

  Args:
    mixture: the current :class:`Mixture`.
    w: the weights, an array or pytree of arrays (leaves concatenated).
    precision_prior: None or (α, β), α > 0, β >= 0, for the free components'
      precisions.
    zero_precision_prior: None or (α, β) for the zero component's precision.
    damping: d in [0, 1).
    learn_zero_weight: also re-estimate π_0 ∝ N_0.

  Returns:
    The updated :class:`Mixture` (float32).

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> w = jnp.array([-1.0, -0.9, 0.9, 1.0])
    >>> m = ss.init_mixture(w, 2, zero_component=False)  # means ±1, σ = 1
    >>> for _ in range(3):
    ...   m = ss.em_step(m, w)
    >>> [round(x, 3) for x in m.means.tolist()], [round(p, 3) for p in m.weights.tolist()]
    ([-0.95, 0.95], [0.5, 0.5])
  """
  check_mixture(mixture)
  if not is_traced(damping) and not 0.0 <= float(damping) < 1.0:
    raise ValueError(f"damping must be in [0, 1), got {damping!r}.")
  priors = PrecisionPriors.of(check_gamma_prior("precision_prior", precision_prior),
                              check_gamma_prior("zero_precision_prior", zero_precision_prior))
  x = flat_weights(w, "w")
  new, used = em(mixture, x, priors, jnp.asarray(damping, jnp.float32), bool(learn_zero_weight))
  if not is_traced(used) and float(used) == 0:
    raise ValueError(f"w has no usable weight: all {x.size} are NaN, Inf, or too far from every "
                     "component of mixture for a finite density (check the weights and the mixture).")
  return new


@functools.partial(jax.jit, static_argnums=(4,))
def em(mixture: Mixture, x: jax.Array, priors: PrecisionPriors, damping: jax.Array,
        learn_zero_weight: bool) -> tuple[Mixture, jax.Array]:
  """The new mixture and the number of weights its statistics used."""
  stats = statistics(mixture, x)
  return m_step(mixture, stats, priors, damping, learn_zero_weight), stats.count


def m_step(mixture: Mixture, stats: Statistics, priors: PrecisionPriors, damping: jax.Array | float,
           learn_zero_weight: bool) -> Mixture:
  """The M-step of :func:`em_step` from the :class:`Statistics` of all the weights."""
  k = mixture.num_components
  has_zero = mixture.has_zero
  n_j, srd, srd2 = stats.mass, stats.first, stats.second
  alive = n_j > _DEAD_MASS
  safe_n = jnp.where(alive, n_j, 1.0)
  old_mu = mixture.means
  shift = jnp.where(alive, srd / safe_n, 0.0)
  if has_zero:
    shift = shift.at[0].set(0.0)
  mu = old_mu + shift
  # Σ r (x − μ_new)² = Σ r d² − 2 δ Σ r d + δ² Σ r, with δ = μ_new − μ_old.
  s2 = jnp.maximum(srd2 - 2.0 * shift * srd + jnp.square(shift) * n_j, 0.0)

  alpha, beta = priors.per_component(mixture)
  num = jnp.maximum(n_j / 2 + alpha - 1.0, TINY)
  den = jnp.maximum(0.5 * s2 + beta, TINY)
  old_gamma = jnp.asarray(mixture.log_precisions, jnp.float32)
  gamma = jnp.clip(jnp.log(num) - jnp.log(den), -MAX_LOG_PRECISION, MAX_LOG_PRECISION)
  gamma = jnp.where(alive, gamma, old_gamma)

  old_pi = mixture.weights
  is_zero = (jnp.arange(k) == 0) if has_zero else jnp.zeros((k,), bool)
  learned = ~is_zero | learn_zero_weight  # the components whose proportions are re-estimated
  mass = jnp.sum(jnp.where(learned, old_pi, 0.0))  # what they share
  dead_mass = jnp.sum(jnp.where(learned & ~alive, old_pi, 0.0))
  live_n = jnp.sum(jnp.where(learned & alive, n_j, 0.0))
  share = (mass - dead_mass) * n_j / jnp.where(live_n > 0, live_n, 1.0)
  pi = jnp.where(learned & alive, share, old_pi)

  d = damping
  mu = d * old_mu + (1 - d) * mu
  gamma = d * old_gamma + (1 - d) * gamma
  pi = d * old_pi + (1 - d) * pi

  free_pi = pi[1:] if has_zero else pi
  log_free = jnp.log(jnp.maximum(free_pi, TINY))
  log_free_total = jnp.log(jnp.maximum(jnp.sum(free_pi), TINY))
  if has_zero and learn_zero_weight:
    zero_logit = jnp.log(jnp.maximum(pi[0], TINY)) - log_free_total
  else:
    zero_logit = jnp.asarray(mixture.zero_logit, jnp.float32)
  return Mixture(free_means=mu[1:] if has_zero else mu, log_precisions=gamma,
                 logits=log_free - log_free_total, zero_logit=zero_logit, has_zero=has_zero)
