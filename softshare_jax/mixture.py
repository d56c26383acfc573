"""Mixture-of-Gaussians prior on weights (Nowlan & Hinton 1992; Ullrich et al. 2017).

    p(w) = Π_i Σ_j π_j N(w_i | μ_j, 1/λ_j),   λ_j = exp(γ_j)

With a zero component (Ullrich, Meeds & Welling 2017) component 0 has μ_0 = 0
exactly and proportion π_0 = sigmoid(ζ); the free components share the rest,
π_{1..} = (1 − π_0) softmax(η). Without one, π = softmax(η).

This module holds the pure functions: the :class:`Mixture` pytree, the
log-density and responsibilities (log space, float32), initializers, one
closed-form EM step and the post-training merge of close components. The
Optax transform ``mixture_prior`` is built on top of them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_INITS = ("range", "quantile", "kmeans++")
_LOG_2PI = math.log(2.0 * math.pi)
# Log-precisions produced here are clipped to ±_MAX_LOG_PRECISION (λ ≤ 1e26), so
# ½ λ (w − μ)² stays finite in float32 for |w − μ| up to ~1e6.
_MAX_LOG_PRECISION = 60.0
# A component whose total responsibility N_j is below this is "dead" in em_step.
_DEAD_MASS = 1e-6
_TINY = 1e-30
_KMEANS_ITERATIONS = 10


# ----------------------------------------------------------------------------
# The mixture.


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


def _from_components(means: np.ndarray, log_precisions: np.ndarray, weights: np.ndarray,
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


def _check_mixture(mixture: Any) -> None:
  if not isinstance(mixture, Mixture):
    raise ValueError(f"mixture must be a Mixture, got {type(mixture).__name__}.")


def _flat_weights(weights: Any, name: str) -> jax.Array:
  """The leaves of ``weights`` (an array or a pytree of arrays), raveled and concatenated, float32."""
  leaves = jax.tree.leaves(weights)
  if not leaves:
    raise ValueError(f"{name} must be an array or a non-empty pytree of arrays.")
  flat = jnp.concatenate([jnp.ravel(jnp.asarray(x)).astype(jnp.float32) for x in leaves])
  if flat.size == 0:
    raise ValueError(f"{name} must contain at least one weight.")
  return flat


# ----------------------------------------------------------------------------
# Densities.


def _log_joint(mixture: Mixture, w: jax.Array) -> jax.Array:
  """log π_j + log N(w | μ_j, 1/λ_j), shape w.shape + (K,), float32."""
  w = jnp.asarray(w).astype(jnp.float32)[..., None]
  gamma = jnp.asarray(mixture.log_precisions, jnp.float32)
  lam = jnp.exp(gamma)
  return mixture.log_weights + 0.5 * gamma - 0.5 * _LOG_2PI - 0.5 * lam * jnp.square(w - mixture.means)


@jax.jit
def _log_prob(mixture: Mixture, w: jax.Array) -> jax.Array:
  return jax.nn.logsumexp(_log_joint(mixture, w), axis=-1)


@jax.jit
def _responsibilities(mixture: Mixture, w: jax.Array) -> jax.Array:
  return jax.nn.softmax(_log_joint(mixture, w), axis=-1)


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
  _check_mixture(mixture)
  return _log_prob(mixture, jnp.asarray(w))


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
  _check_mixture(mixture)
  return _responsibilities(mixture, jnp.asarray(w))


# ----------------------------------------------------------------------------
# Initializers.


def _spacing_stddevs(means: jax.Array, fallback: jax.Array) -> jax.Array:
  """σ_k = half the mean gap from μ_k to its neighbours (sorted means); ``fallback`` for K = 1."""
  k = means.shape[0]
  if k == 1:
    return jnp.reshape(fallback, (1,))
  gaps = jnp.diff(means)
  left = jnp.concatenate([gaps[:1], gaps])
  right = jnp.concatenate([gaps, gaps[-1:]])
  return 0.25 * (left + right)


def _kmeans_pp(w: jax.Array, k: int, key: jax.Array) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii 2007) then Lloyd iterations; sorted centres."""
  keys = jax.random.split(key, k)
  centres = [jax.random.choice(keys[0], w)]
  d2 = jnp.square(w - centres[0])
  for i in range(1, k):
    total = jnp.sum(d2)
    p = jnp.where(total > 0, d2 / jnp.where(total > 0, total, 1.0), 1.0 / w.shape[0])
    c = jax.random.choice(keys[i], w, p=p)
    centres.append(c)
    d2 = jnp.minimum(d2, jnp.square(w - c))
  centres = jnp.stack(centres)

  def lloyd(_, c):
    assign = jnp.argmin(jnp.square(w[:, None] - c[None, :]), axis=-1)
    counts = jax.ops.segment_sum(jnp.ones_like(w), assign, k)
    sums = jax.ops.segment_sum(w, assign, k)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c)

  centres = jax.lax.fori_loop(0, _KMEANS_ITERATIONS, lloyd, centres)
  return jnp.sort(centres)


def init_mixture(
    weights: Any,
    num_components: int,
    *,
    zero_component: bool = True,
    zero_weight: float = 0.99,
    init: str = "range",
    key: jax.Array | None = None,
) -> Mixture:
  """A starting mixture for the given (masked) weights.

  The free components (``num_components`` of them) get:

  - ``"range"``: means evenly spaced over [min w, max w];
  - ``"quantile"``: means at the quantiles (k + ½)/F, k = 0..F−1, of the
    weights (the medians of F equal-mass bins; linear interpolation as
    ``np.quantile``);
  - ``"kmeans++"``: k-means++ seeding with ``key``, then 10 Lloyd iterations,
    sorted.

  Every init gives the free components equal proportions and a stddev equal to
  half the mean gap to their neighbouring means (the one gap at either end),
  so neighbours meet one σ from each mean (the weights' stddev when F = 1),
  floored at 1e-6. The zero component has mean 0,
  π_0 = ``zero_weight`` and the stddev 1.4826 · median|w| (the median absolute
  deviation about 0: a robust estimate, consistent for Gaussian weights, of the
  spread of the mass of weights near 0, which outliers do not inflate),
  floored at 1e-6.

  Traceable: may run under ``jax.jit`` with static arguments.

  Args:
    weights: an array or a pytree of arrays (the leaves are concatenated).
    num_components: F >= 1, the number of FREE components (with a zero
      component the mixture has F + 1).
    zero_component: whether to add the zero component (Ullrich et al.).
    zero_weight: π_0 in (0, 1).
    init: ``"range"``, ``"quantile"`` or ``"kmeans++"``.
    key: a PRNG key, required by ``"kmeans++"``.

  Returns:
    A :class:`Mixture` with float32 leaves.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> m = ss.init_mixture(jnp.array([-1.0, 0.0, 0.1, 1.0]), 3, zero_weight=0.7)
    >>> m.means.tolist(), [round(p, 3) for p in m.weights.tolist()]
    ([0.0, -1.0, 0.0, 1.0], [0.7, 0.1, 0.1, 0.1])
  """
  if isinstance(num_components, bool) or not isinstance(num_components, (int, np.integer)) or num_components < 1:
    raise ValueError(f"num_components must be an int >= 1, got {num_components!r}.")
  if not isinstance(zero_weight, jax.core.Tracer) and not 0.0 < float(zero_weight) < 1.0:
    raise ValueError(f"zero_weight must be in (0, 1), got {zero_weight!r}.")
  if init not in _INITS:
    raise ValueError(f"init must be one of {_INITS}, got {init!r}.")
  if init == "kmeans++" and key is None:
    raise ValueError("key is required for init='kmeans++' (a jax.random key).")
  w = _flat_weights(weights, "weights")
  return _init(w, jnp.asarray(zero_weight, jnp.float32), key, int(num_components), bool(zero_component), init)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _init(w: jax.Array, zero_weight: jax.Array, key: Any, f: int, zero_component: bool, init: str) -> Mixture:
  lo, hi = jnp.min(w), jnp.max(w)
  spread = jnp.std(w)
  if init == "range":
    means = (lo + hi) / 2 * jnp.ones((1,)) if f == 1 else jnp.linspace(lo, hi, f)
  elif init == "quantile":
    means = jnp.quantile(w, (jnp.arange(f, dtype=jnp.float32) + 0.5) / f)
  else:
    means = _kmeans_pp(w, f, key)
  stds = jnp.maximum(_spacing_stddevs(means.astype(jnp.float32), spread), 1e-6)
  log_prec = -2.0 * jnp.log(stds)
  if zero_component:
    zero_std = jnp.maximum(1.4826 * jnp.median(jnp.abs(w)), 1e-6)
    log_prec = jnp.concatenate([(-2.0 * jnp.log(zero_std))[None], log_prec])
    zero_logit = jnp.log(zero_weight) - jnp.log1p(-zero_weight)
  else:
    zero_logit = jnp.zeros((), jnp.float32)
  return Mixture(
      free_means=means.astype(jnp.float32),
      log_precisions=log_prec.astype(jnp.float32),
      logits=jnp.zeros((f,), jnp.float32),
      zero_logit=jnp.asarray(zero_logit, jnp.float32),
      has_zero=zero_component,
  )


# ----------------------------------------------------------------------------
# EM.


def _prior_terms(prior: Any, name: str) -> tuple[float, float]:
  if prior is None:
    return 1.0, 0.0
  try:
    alpha, beta = prior
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be None or a pair (alpha, beta), got {prior!r}.") from None
  if not isinstance(alpha, jax.core.Tracer) and not isinstance(beta, jax.core.Tracer):
    if not float(alpha) > 0 or not float(beta) >= 0:
      raise ValueError(f"{name} must have alpha > 0 and beta >= 0, got {prior!r}.")
  return alpha, beta


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
  proportions. Memory is ``w.size × K``.

  Args:
    mixture: the current :class:`Mixture`.
    w: the weights, an array or pytree of arrays (leaves concatenated).
    precision_prior: None or (α, β) for the free components' precisions.
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
  _check_mixture(mixture)
  if isinstance(damping, jax.core.Tracer):
    pass
  elif not 0.0 <= float(damping) < 1.0:
    raise ValueError(f"damping must be in [0, 1), got {damping!r}.")
  a_free, b_free = _prior_terms(precision_prior, "precision_prior")
  a_zero, b_zero = _prior_terms(zero_precision_prior, "zero_precision_prior")
  x = _flat_weights(w, "w")
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  return _em(mixture, x, f32(a_free), f32(b_free), f32(a_zero), f32(b_zero), f32(damping), bool(learn_zero_weight))


def em_statistics(mixture: Mixture, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Σ_i r_ij, Σ_i r_ij d_ij and Σ_i r_ij d_ij² with d_ij = x_i − μ_j (current means).

  The M-step needs nothing else, so a large weight vector can be summed in
  chunks. Centring on the current means keeps the second moment free of
  cancellation.
  """
  r = jax.nn.softmax(_log_joint(mixture, x), axis=-1)
  d = x[..., None] - mixture.means
  axes = tuple(range(r.ndim - 1))
  rd = r * d
  return jnp.sum(r, axis=axes), jnp.sum(rd, axis=axes), jnp.sum(rd * d, axis=axes)


@functools.partial(jax.jit, static_argnums=(7,))
def _em(mixture: Mixture, x: jax.Array, a_free: jax.Array, b_free: jax.Array, a_zero: jax.Array,
        b_zero: jax.Array, damping: jax.Array, learn_zero_weight: bool) -> Mixture:
  return em_from_statistics(mixture, em_statistics(mixture, x), a_free, b_free, a_zero, b_zero,
                            damping, learn_zero_weight)


def em_from_statistics(mixture: Mixture, stats: tuple[jax.Array, jax.Array, jax.Array],
                       a_free: jax.Array, b_free: jax.Array, a_zero: jax.Array, b_zero: jax.Array,
                       damping: jax.Array, learn_zero_weight: bool) -> Mixture:
  """The M-step of :func:`em_step` from :func:`em_statistics` (summed over all weights)."""
  k = mixture.num_components
  has_zero = mixture.has_zero
  n_j, srd, srd2 = stats
  alive = n_j > _DEAD_MASS
  safe_n = jnp.where(alive, n_j, 1.0)
  old_mu = mixture.means
  shift = jnp.where(alive, srd / safe_n, 0.0)
  if has_zero:
    shift = shift.at[0].set(0.0)
  mu = old_mu + shift
  # Σ r (x − μ_new)² = Σ r d² − 2 δ Σ r d + δ² Σ r, with δ = μ_new − μ_old.
  s2 = jnp.maximum(srd2 - 2.0 * shift * srd + jnp.square(shift) * n_j, 0.0)

  is_zero = jnp.arange(k) == 0 if has_zero else jnp.zeros((k,), bool)
  alpha = jnp.where(is_zero, a_zero, a_free)
  beta = jnp.where(is_zero, b_zero, b_free)
  num = jnp.maximum(n_j / 2 + alpha - 1.0, _TINY)
  den = jnp.maximum(0.5 * s2 + beta, _TINY)
  old_gamma = jnp.asarray(mixture.log_precisions, jnp.float32)
  gamma = jnp.clip(jnp.log(num) - jnp.log(den), -_MAX_LOG_PRECISION, _MAX_LOG_PRECISION)
  gamma = jnp.where(alive, gamma, old_gamma)

  old_pi = mixture.weights
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
  log_free = jnp.log(jnp.maximum(free_pi, _TINY))
  log_free_total = jnp.log(jnp.maximum(jnp.sum(free_pi), _TINY))
  if has_zero and learn_zero_weight:
    zero_logit = jnp.log(jnp.maximum(pi[0], _TINY)) - log_free_total
  else:
    zero_logit = jnp.asarray(mixture.zero_logit, jnp.float32)
  return Mixture(
      free_means=mu[1:] if has_zero else mu,
      log_precisions=gamma,
      logits=log_free - log_free_total,
      zero_logit=zero_logit,
      has_zero=has_zero,
  )


# ----------------------------------------------------------------------------
# Merging (compression, after training).


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
  _check_mixture(mixture)
  if isinstance(threshold, jax.core.Tracer):
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
    gamma[a] = float(np.float32(np.clip(-np.log(new_var), -_MAX_LOG_PRECISION, _MAX_LOG_PRECISION)))
    pi[a] = p
    del mu[b], gamma[b], pi[b]
  return _from_components(np.asarray(mu), np.asarray(gamma), np.asarray(pi), has_zero)
