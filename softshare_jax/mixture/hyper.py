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
