"""Starting mixtures for given weights: evenly spaced, quantiles or k-means++."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from softshare_jax._checks import check_choice
from softshare_jax._checks import check_int
from softshare_jax._checks import check_open_unit
from softshare_jax._checks import require_key
from softshare_jax.mixture._model import flat_weights
from softshare_jax.mixture._model import Mixture

INITS = ("range", "quantile", "kmeans++")
_KMEANS_ITERATIONS = 10


def _spacing_stddevs(means: jax.Array, fallback: jax.Array) -> jax.Array:
  """σ_k = half the mean gap from μ_k to its neighbours (sorted means); ``fallback`` for K = 1."""
  k = means.shape[0]
  if k == 1:
    return jnp.reshape(fallback, (1,))
  gaps = jnp.diff(means)
  left = jnp.concatenate([gaps[:1], gaps])
  right = jnp.concatenate([gaps, gaps[-1:]])
  return 0.25 * (left + right)


def kmeans_pp(w: jax.Array, k: int, key: jax.Array) -> jax.Array:
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
  f = check_init_args(num_components, zero_weight, init, key)
  w = flat_weights(weights, "weights")
  return _init(w, jnp.asarray(zero_weight, jnp.float32), key, f, bool(zero_component), init)


def check_init_args(num_components: Any, zero_weight: Any, init: Any, key: Any) -> int:
  """Checks the arguments :func:`init_mixture` and ``mixture_prior`` share; returns F."""
  f = check_int("num_components", num_components)
  check_open_unit("zero_weight", zero_weight)
  if check_choice("init", init, INITS) == "kmeans++":
    require_key("init='kmeans++'", key)
  return f


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _init(w: jax.Array, zero_weight: jax.Array, key: Any, f: int, zero_component: bool, init: str) -> Mixture:
  lo, hi = jnp.min(w), jnp.max(w)
  spread = jnp.std(w)
  if init == "range":
    means = (lo + hi) / 2 * jnp.ones((1,)) if f == 1 else jnp.linspace(lo, hi, f)
  elif init == "quantile":
    means = jnp.quantile(w, (jnp.arange(f, dtype=jnp.float32) + 0.5) / f)
  else:
    means = kmeans_pp(w, f, key)
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
