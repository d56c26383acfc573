"""Starting mixtures for given weights: evenly spaced, quantiles or k-means++."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from softshare_jax.checks import check_choice
from softshare_jax.checks import check_int
from softshare_jax.checks import check_open_unit
from softshare_jax.checks import is_traced
from softshare_jax.checks import require_key
from softshare_jax.mixture.model import flat_weights
from softshare_jax.mixture.model import MAX_WEIGHT
from softshare_jax.mixture.model import Mixture
from softshare_jax.mixture.model import usable

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


def kmeans_pp(w: jax.Array, k: int, key: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii 2007) then Lloyd iterations; sorted centres.

  Only the weights where ``valid`` (all when None) are drawn or averaged. Memory
  is O(len(w) + k): nearest centres come from the sorted centres' midpoints,
  not from a (len(w), k) distance matrix, and the seeding is a loop, not k
  unrolled steps.
  """
  n = w.shape[0]
  keys = jax.random.split(key, k)
  if valid is None:
    first = jax.random.choice(keys[0], w)
    live = jnp.ones_like(w)
  else:
    live = valid.astype(w.dtype)
    w = jnp.where(valid, w, 0.0)
    first = jax.random.choice(keys[0], w, p=live / jnp.maximum(jnp.sum(live), 1.0))
  d2 = live * jnp.square(w - first)

  def seed(i, carry):
    centres, d2 = carry
    total = jnp.sum(d2)
    uniform = live / jnp.maximum(jnp.sum(live), 1.0) if valid is not None else 1.0 / n
    p = jnp.where(total > 0, d2 / jnp.where(total > 0, total, 1.0), uniform)
    c = jax.random.choice(keys[i], w, p=p)
    return centres.at[i].set(c), jnp.minimum(d2, live * jnp.square(w - c))

  centres = jnp.zeros((k,), w.dtype).at[0].set(first)
  centres, _ = jax.lax.fori_loop(1, k, seed, (centres, d2))

  def lloyd(_, c):
    c = jnp.sort(c)
    # In 1-D the nearest centre is the one between the neighbouring midpoints
    # (ties to the lower one, as argmin would).
    assign = jnp.searchsorted((c[1:] + c[:-1]) / 2, w, side="left")
    counts = jax.ops.segment_sum(live, assign, k)
    sums = jax.ops.segment_sum(live * w, assign, k)
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

  NaN and ±Inf weights are ignored (a diverged weight must not make the
  starting mixture NaN); with no finite weight at all it raises a
  ``ValueError`` naming ``weights``, except under ``jit``, where the check
  cannot run and the mixture is NaN.

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
  return initial_mixture(weights, f, zero_component=zero_component, zero_weight=zero_weight, init=init,
                         key=key, name="weights")


def initial_mixture(weights: Any, f: int, *, zero_component: bool, zero_weight: Any, init: str, key: Any,
                    name: str) -> Mixture:
  """:func:`init_mixture` after its argument checks; ``name`` is the weights' name in errors."""
  w = flat_weights(weights, name)
  if not is_traced(w) and not bool(jnp.any(usable(w))):
    raise ValueError(f"{name} has no usable value (all {w.size} are NaN, Inf or above {MAX_WEIGHT:g} in "
                     "magnitude): cannot start a mixture from it.")
  return _start(w, jnp.asarray(zero_weight, jnp.float32), key, f, bool(zero_component), init)


def check_init_args(num_components: Any, zero_weight: Any, init: Any, key: Any) -> int:
  """Checks the arguments :func:`init_mixture` and ``mixture_prior`` share; returns F."""
  f = check_int("num_components", num_components)
  check_open_unit("zero_weight", zero_weight)
  if check_choice("init", init, INITS) == "kmeans++":
    require_key("init='kmeans++'", key)
  return f


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _start(w: jax.Array, zero_weight: jax.Array, key: Any, f: int, zero_component: bool, init: str) -> Mixture:
  # NaN stands for every unusable weight, so that the nan-reductions skip them.
  finite = usable(w)
  w = jnp.where(finite, w, jnp.nan)
  lo, hi = jnp.nanmin(w), jnp.nanmax(w)
  spread = jnp.nanstd(w)
  if init == "range":
    means = (lo + hi) / 2 * jnp.ones((1,)) if f == 1 else jnp.linspace(lo, hi, f)
  elif init == "quantile":
    means = jnp.nanquantile(w, (jnp.arange(f, dtype=jnp.float32) + 0.5) / f)
  else:
    means = kmeans_pp(w, f, key, finite)
  stds = jnp.maximum(_spacing_stddevs(means.astype(jnp.float32), spread), 1e-6)
  log_prec = -2.0 * jnp.log(stds)
  if zero_component:
    zero_std = jnp.maximum(1.4826 * jnp.nanmedian(jnp.abs(w)), 1e-6)
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
