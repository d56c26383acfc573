"""Hyper-priors on the mixture: Gamma(α, β) on each precision, Beta(a, b) on π_0.

One validator per kind of prior, used by every entry point that takes one
(``em_step``, ``mixture_prior``), and the cost they add (docs/design.md §4.1):

    −log Gamma(λ | α, β) = −(α − 1) γ + β λ + const,   γ = log λ
    −log Beta(π_0 | a, b) = −(a − 1) log π_0 − (b − 1) log(1 − π_0) + const
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softshare_jax.checks import is_traced
from softshare_jax.mixture.model import Mixture

# Gamma(1, 0), the flat prior on λ: the EM step reduces to maximum likelihood.
_FLAT = (1.0, 0.0)


def _pair(name: str, value: Any, rule: str, ok) -> tuple[Any, Any]:
  try:
    a, b = value
    good = all(is_traced(x) or (np.ndim(x) == 0 and np.isfinite(float(x))) for x in (a, b))
    good = good and (is_traced(a) or is_traced(b) or ok(float(a), float(b)))
  except (TypeError, ValueError):
    good = False
  if not good:
    raise ValueError(f"{name} must be None or a pair of finite numbers {rule}, got {value!r}.")
  return a, b


def check_gamma_prior(name: str, value: Any) -> tuple[Any, Any] | None:
  """None, or a Gamma(α, β) prior on a precision: α > 0, β >= 0 (β = 0 is improper but usable)."""
  if value is None:
    return None
  return _pair(name, value, "(alpha, beta) with alpha > 0 and beta >= 0", lambda a, b: a > 0 and b >= 0)


def check_beta_prior(name: str, value: Any) -> tuple[Any, Any] | None:
  """None, or a Beta(a, b) prior on a proportion: a, b > 0."""
  if value is None:
    return None
  return _pair(name, value, "(a, b) with a > 0 and b > 0", lambda a, b: a > 0 and b > 0)


class PrecisionPriors(NamedTuple):
  """Gamma parameters of the free and the zero components' precisions, float32 (flat when None)."""

  alpha_free: jax.Array
  beta_free: jax.Array
  alpha_zero: jax.Array
  beta_zero: jax.Array

  @classmethod
  def of(cls, precision_prior: Any, zero_precision_prior: Any) -> "PrecisionPriors":
    """From checked ``(α, β)`` pairs or None."""
    free = _FLAT if precision_prior is None else precision_prior
    zero = _FLAT if zero_precision_prior is None else zero_precision_prior
    return cls(*(jnp.asarray(x, jnp.float32) for x in (*free, *zero)))

  def per_component(self, m: Mixture) -> tuple[jax.Array, jax.Array]:
    """``(K,)`` α and β, the zero component's first when there is one."""
    k = m.num_components
    is_zero = (jnp.arange(k) == 0) if m.has_zero else jnp.zeros((k,), bool)
    return (jnp.where(is_zero, self.alpha_zero, self.alpha_free),
            jnp.where(is_zero, self.beta_zero, self.beta_free))


def hyper_cost(m: Mixture, precision_prior: Any, zero_precision_prior: Any, zero_weight_prior: Any,
               learn_zero_weight: bool) -> jax.Array:
  """−log of the hyper-priors (up to constants): Gamma on each λ_j, Beta on π_0."""
  gamma = jnp.asarray(m.log_precisions, jnp.float32)
  cost = jnp.zeros((), jnp.float32)
  if precision_prior is not None or zero_precision_prior is not None:
    alpha, beta = PrecisionPriors.of(precision_prior, zero_precision_prior).per_component(m)
    cost = cost + jnp.sum(-(alpha - 1.0) * gamma + beta * jnp.exp(gamma))
  if learn_zero_weight and m.has_zero and zero_weight_prior is not None and np.shape(m.free_means)[0] > 0:
    a, b = zero_weight_prior
    z = jnp.asarray(m.zero_logit, jnp.float32)
    cost = cost - (a - 1.0) * jax.nn.log_sigmoid(z) - (b - 1.0) * jax.nn.log_sigmoid(-z)
  return cost


# The default precision prior of ``mixture_prior`` (and ``mixture_penalty`` on request): Fraley &
# Raftery's (2007) weakly informative conjugate prior for 1-D mixtures, σ_j² ~ InvGamma(ν/2, ς²/2)
# with ν = 3 and ς² = var(w) / K², i.e. λ_j ~ Gamma(3/2, var(w) / (2 K²)). Its β bounds every
# precision, λ_j ≤ (N_j/2 + 1/2) / β, so a component holding one weight keeps σ ≥ std(w)/(K √2)
# instead of collapsing to the degenerate σ → 0 maximum of the likelihood; with many weights per
# component it is negligible (a pseudo-count of one weight of spread std(w)/K).
AUTO = "auto"
AUTO_ALPHA = 1.5


def check_precision_prior(name: str, value: Any) -> Any:
  """None, ``"auto"`` (:func:`auto_precision_prior`), or a checked Gamma(α, β) pair."""
  if isinstance(value, str):
    if value != AUTO:
      raise ValueError(f"{name} must be None, {AUTO!r} or a pair (alpha, beta), got {value!r}.")
    return AUTO
  return check_gamma_prior(name, value)


def auto_precision_prior(variance: jax.Array, num_components: int) -> tuple[jax.Array, jax.Array]:
  """Gamma(3/2, var(w) / (2 K²)): Fraley & Raftery's (2007) default prior on a 1-D precision.

  ``variance`` is the variance of the weights the mixture models; it is
  floored at 1e-30 (all weights equal: the prior stays proper) and not
  differentiated (an empirical-Bayes scale, not part of the objective).
  """
  var = jnp.maximum(jax.lax.stop_gradient(jnp.asarray(variance, jnp.float32)), 1e-30)
  return jnp.asarray(AUTO_ALPHA, jnp.float32), var / (2.0 * float(num_components) ** 2)


def resolve_precision_priors(m: Mixture, precision_prior: Any, zero_precision_prior: Any,
                             variance: jax.Array) -> tuple[Any, Any]:
  """The two priors with ``"auto"`` replaced by :func:`auto_precision_prior` of ``variance``."""
  auto = auto_precision_prior(variance, m.num_components)
  return tuple(auto if isinstance(p, str) else p for p in (precision_prior, zero_precision_prior))


def weight_variance(m: Mixture, stats: Any) -> jax.Array:
  """The variance of the weights summed in ``stats`` (a ``statistics.Statistics`` taken at ``m``).

  From the per-component sums alone, Σ w = Σ_j (N_j μ_j + S1_j) and
  Σ w² = Σ_j (S2_j + 2 μ_j S1_j + N_j μ_j²), so no second pass over the weights.
  """
  mu = m.means
  n = jnp.maximum(stats.count, 1.0)
  mean = jnp.sum(stats.mass * mu + stats.first) / n
  second = jnp.sum(stats.second + 2.0 * mu * stats.first + stats.mass * jnp.square(mu)) / n
  return jnp.maximum(second - jnp.square(mean), 0.0)
