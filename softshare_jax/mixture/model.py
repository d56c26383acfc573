"""The :class:`Mixture` pytree: the free parameters of a mixture of 1-D Gaussians.

    p(w) = Π_i Σ_j π_j N(w_i | μ_j, 1/λ_j),   λ_j = exp(γ_j)

With a zero component (Ullrich, Meeds & Welling 2017) component 0 has μ_0 = 0
exactly and proportion π_0 = sigmoid(ζ); the free components share the rest,
π_{1..} = (1 − π_0) softmax(η). Without one, π = softmax(η). See
docs/design.md §4.1.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Log-precisions are clipped to ±MAX_LOG_PRECISION (λ ≤ 1e26), so ½ λ (w − μ)²
# stays finite in float32 for |w − μ| up to ~1e6.
MAX_LOG_PRECISION = 60.0
# The floor of probabilities and counts before a log: keeps log finite.
TINY = 1e-30
# The largest |w| the mixture learns from. Beyond it, float32 sums of r·(w − μ)²
# over ~1e8 weights overflow; no trained network holds such weights, so they
# are treated like NaN/Inf (left out, documented in mixture_prior).
MAX_WEIGHT = 1e12


def usable(w: jax.Array) -> jax.Array:
  """Where ``w`` is finite and at most :data:`MAX_WEIGHT` in magnitude."""
  return jnp.isfinite(w) & (jnp.abs(w) <= MAX_WEIGHT)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["free_means", "log_precisions", "logits", "zero_logit"],
    meta_fields=["has_zero"],
)
@dataclasses.dataclass(frozen=True)
class Mixture:
  """The free parameters of a mixture of 1-D Gaussians; a pytree.

  Attributes:
    free_means: ``(F,)`` means μ of the free components.
    log_precisions: ``(K,)`` γ = log λ of ALL components, the zero component
      first when there is one (K = F + 1 with a zero component, F without).
    logits: ``(F,)`` mixing logits η of the free components.
    zero_logit: ``()`` ζ, the zero component's logit: π_0 = sigmoid(ζ). Unused
      (and kept as a leaf, so the tree structure does not depend on values)
      without a zero component, or when it is the only component (π_0 = 1).
    has_zero: static; whether component 0 is the zero component (μ_0 = 0).

  The properties ``means``, ``precisions``, ``stddevs``, ``weights`` cover all
  K components, the zero component first, and ``weights`` sums to 1.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> m = ss.Mixture(free_means=jnp.array([-1.0, 1.0]),
    ...                log_precisions=jnp.zeros(3), logits=jnp.zeros(2),
    ...                zero_logit=jnp.array(0.0), has_zero=True)
    >>> m.num_components, m.means, m.weights
    (3, Array([ 0., -1.,  1.], dtype=float32), Array([0.5 , 0.25, 0.25], dtype=float32))
  """

  free_means: jax.Array
  log_precisions: jax.Array
  logits: jax.Array
  zero_logit: jax.Array
  has_zero: bool = True

  @property
  def num_components(self) -> int:
    """K, all components (the zero component included)."""
    return int(np.shape(self.free_means)[0]) + int(self.has_zero)

  @property
  def means(self) -> jax.Array:
    """``(K,)`` μ, with μ_0 = 0 exactly for the zero component."""
    mu = jnp.asarray(self.free_means, jnp.float32)
    if self.has_zero:
      mu = jnp.concatenate([jnp.zeros((1,), jnp.float32), mu])
    return mu

  @property
  def precisions(self) -> jax.Array:
    """``(K,)`` λ = exp(γ)."""
    return jnp.exp(jnp.asarray(self.log_precisions, jnp.float32))

  @property
  def stddevs(self) -> jax.Array:
    """``(K,)`` σ = λ^(−1/2) = exp(−γ/2)."""
    return jnp.exp(-0.5 * jnp.asarray(self.log_precisions, jnp.float32))

  @property
  def log_weights(self) -> jax.Array:
    """``(K,)`` log π, computed without forming π (stable as π → 0)."""
    free = jax.nn.log_softmax(jnp.asarray(self.logits, jnp.float32))
    if not self.has_zero:
      return free
    if free.shape[0] == 0:  # only the zero component: π_0 = 1 whatever ζ
      return jnp.zeros((1,), jnp.float32)
    z = jnp.asarray(self.zero_logit, jnp.float32)
    return jnp.concatenate([jax.nn.log_sigmoid(z)[None], jax.nn.log_sigmoid(-z) + free])

  @property
  def weights(self) -> jax.Array:
    """``(K,)`` mixing proportions π; they sum to 1."""
    return jnp.exp(self.log_weights)


def from_components(means: np.ndarray, log_precisions: np.ndarray, weights: np.ndarray,
                    has_zero: bool) -> Mixture:
  """A Mixture from all-component float64 host arrays (weights need not be normalized)."""
  weights = np.asarray(weights, np.float64)
  free = weights[1:] if has_zero else weights
  free_total = float(np.sum(free))
  logits = np.log(np.maximum(free, 1e-300)) - np.log(max(free_total, 1e-300))
  zero_logit = np.log(max(float(weights[0]), 1e-300)) - np.log(max(free_total, 1e-300)) if has_zero else 0.0
  return Mixture(
      free_means=jnp.asarray(np.asarray(means)[1:] if has_zero else means, jnp.float32),
      log_precisions=jnp.asarray(log_precisions, jnp.float32),
      logits=jnp.asarray(logits, jnp.float32),
      zero_logit=jnp.asarray(zero_logit, jnp.float32),
      has_zero=has_zero,
  )


def as_float32(m: Mixture) -> Mixture:
  """``m`` with float32 leaves (an optimizer may hand back other dtypes)."""
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), m)


def check_mixture(mixture: Any, name: str = "mixture") -> Mixture:
  """``mixture`` if it is a :class:`Mixture`."""
  if not isinstance(mixture, Mixture):
    raise ValueError(f"{name} must be a Mixture, got {type(mixture).__name__}.")
  return mixture


def flat_weights(weights: Any, name: str) -> jax.Array:
  """The leaves of ``weights`` (an array or a pytree of arrays), raveled and concatenated, float32."""
  leaves = jax.tree.leaves(weights)
  if not leaves:
    raise ValueError(f"{name} must be an array or a non-empty pytree of arrays.")
  flat = jnp.concatenate([jnp.ravel(jnp.asarray(x)).astype(jnp.float32) for x in leaves])
  if flat.size == 0:
    raise ValueError(f"{name} must contain at least one weight.")
  return flat


def check_finite_mixture(mixture: Any, name: str = "mixture") -> Mixture:
  """``mixture`` if it is a concrete :class:`Mixture` whose parameters are finite.

  For the host tools (quantizing, merging), where a NaN mean would become a
  codebook entry and a NaN precision would send every weight to one
  component. The precisions λ = exp(γ) must be finite and > 0 in float32
  (|γ| up to about 88). An unused ``zero_logit`` (no zero component, or no
  free one) is not checked.
  """
  check_mixture(mixture, name)
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(mixture)):
    raise ValueError(f"{name} must have concrete values (these tools run on the host, not under jit).")
  parts = {"free_means": mixture.free_means, "log_precisions": mixture.log_precisions, "logits": mixture.logits}
  if mixture.has_zero and np.shape(mixture.free_means)[0] > 0:
    parts["zero_logit"] = mixture.zero_logit
  for field, value in parts.items():
    x = np.asarray(jax.device_get(value), np.float64)
    if not np.all(np.isfinite(x)):
      raise ValueError(f"{name} is not finite: {field} {_first_bad(x, ~np.isfinite(x))} (a diverged "
                       "mixture: quantizing or merging it would give NaN codebooks or wrong assignments).")
  gamma = np.asarray(jax.device_get(mixture.log_precisions), np.float64)
  lam = np.asarray(jax.device_get(mixture.precisions))
  bad = ~(np.isfinite(lam) & (lam > 0))
  if np.any(bad):
    raise ValueError(f"{name} has precisions exp(log_precisions) that overflow or underflow float32: "
                     f"log_precisions {_first_bad(gamma, bad)} (keep |log_precisions| <= {MAX_LOG_PRECISION:g}).")
  return mixture


def _first_bad(x: np.ndarray, bad: np.ndarray) -> str:
  """"[i] = v, ..." for the first few flagged entries (a K = 10,000 mixture must not fill the message)."""
  idx = np.flatnonzero(np.ravel(bad))
  shown = ", ".join(f"[{i}] = {float(np.ravel(x)[i])!r}" for i in idx[:4])
  return shown + (f" and {idx.size - 4} more" if idx.size > 4 else "")
