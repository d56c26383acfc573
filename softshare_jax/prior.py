"""Soft weight sharing as an Optax transform (Nowlan & Hinton 1992; Ullrich et al. 2017).

:func:`mixture_prior` adds the gradient of a learned mixture-of-Gaussians prior
on the weights to the incoming updates and moves the mixture at every step.
The mixture's math lives in :mod:`softshare_jax.mixture`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from softshare_jax import _checks
from softshare_jax import masks
from softshare_jax import mixture as mixture_lib
from softshare_jax.mixture import Mixture

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]

_UPDATES = ("gradient", "em")
_DEFAULT_CHUNK = 2**16
# Ullrich et al.'s tutorial: Adam with these rates for means, log-precisions, logits.
_LR_MEANS, _LR_LOG_PRECISIONS, _LR_LOGITS = 1e-4, 3e-3, 3e-3


class MixturePriorState(NamedTuple):
  """State of :func:`mixture_prior`.

  Attributes:
    count: the step count (for a ``strength`` schedule).
    mixture: the current :class:`~softshare_jax.Mixture` (float32).
    inner_state: the mixture optimizer's state (``optax.EmptyState()`` for EM).
  """

  count: chex.Array
  mixture: Mixture
  inner_state: optax.OptState


# ----------------------------------------------------------------------------
# Argument checks.


def _check_pair(name: str, value: Any) -> tuple[float, float] | None:
  if value is None:
    return None
  try:
    a, b = value
    ok = all(isinstance(x, jax.core.Tracer) or (np.ndim(x) == 0 and float(x) > 0 and np.isfinite(float(x)))
             for x in (a, b))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{name} must be None or a pair of positive numbers (a, b), got {value!r}.")
  return a, b


# ----------------------------------------------------------------------------
# The mixture optimizer.


def _default_mixture_optimizer() -> optax.GradientTransformation:
  """Adam, with rates 1e-4 (means), 3e-3 (log-precisions), 3e-3 (logits)."""

  def scale(u, params):
    del params
    return Mixture(
        free_means=-_LR_MEANS * u.free_means,
        log_precisions=-_LR_LOG_PRECISIONS * u.log_precisions,
        logits=-_LR_LOGITS * u.logits,
        zero_logit=-_LR_LOGITS * u.zero_logit,
        has_zero=u.has_zero,
    )

  return optax.chain(optax.scale_by_adam(), optax.stateless(scale))


# ----------------------------------------------------------------------------
# Chunked evaluation.


def _terms(m: Mixture, w: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, Any]:
  """Weight gradient and ∂/∂mixture of −Σ log p, from one pass of responsibilities.

  With r_ij the responsibilities, d_ij = w_i − μ_j and N the number of weights
  (DESIGN.md 4.1):

      ∂/∂w_i = Σ_j r_ij λ_j d_ij          ∂/∂μ_j = −λ_j Σ_i r_ij d_ij
      ∂/∂γ_j = −½ Σ_i r_ij (1 − λ_j d_ij²)
      ∂/∂η_j = s_j Σ_i (1 − r_i0) − Σ_i r_ij   (s = softmax(η); without a zero
                                               component r_i0 = 0, s_j = π_j)
      ∂/∂z   = N π_0 − Σ_i r_i0               (z: the zero component's logit)

  Only per-component sums leave the pass, so nothing of size weights ×
  components outlives a chunk. Returns the weight gradient and
  ``(mixture gradient, EM statistics)``: Σ r, Σ r d, Σ r d² per component.
  """
  lj = mixture_lib._log_joint(m, w)  # pylint: disable=protected-access
  r = jax.nn.softmax(lj, axis=-1)
  if valid is not None:
    r = jnp.where(valid[..., None], r, 0.0)
  lam = m.precisions
  d = w[..., None] - m.means
  rd = r * d
  gw = jnp.sum(rd * lam, axis=-1)
  axes = tuple(range(r.ndim - 1))
  sr, srd, srd2 = jnp.sum(r, axis=axes), jnp.sum(rd, axis=axes), jnp.sum(rd * d, axis=axes)
  n = jnp.asarray(w.size if valid is None else jnp.sum(valid), jnp.float32)
  g_mu = -lam * srd
  g_gamma = -0.5 * (sr - lam * srd2)
  if m.has_zero:
    g_logits = jax.nn.softmax(m.logits) * (n - sr[0]) - sr[1:]
    g_zero = n * m.weights[0] - sr[0]
    g_mu = g_mu[1:]
  else:
    g_logits = m.weights * n - sr
    g_zero = jnp.zeros_like(m.zero_logit)
  grads = Mixture(free_means=g_mu, log_precisions=g_gamma, logits=g_logits,
                  zero_logit=jnp.asarray(g_zero, jnp.float32), has_zero=m.has_zero)
  return gw, (grads, (sr, srd, srd2))


def _leaf_terms(m: Mixture, w: jax.Array, chunk: int) -> tuple[jax.Array, Any]:
  """:func:`_terms` on one float32 leaf, ``chunk`` weights at a time when it is larger."""
  n = int(w.size)
  if n <= chunk:
    return _terms(m, w, None)
  pad = (-n) % chunk
  flat = jnp.pad(jnp.ravel(w), (0, pad))
  valid = jnp.arange(n + pad) < n
  blocks, vblocks = flat.reshape(-1, chunk), valid.reshape(-1, chunk)

  def body(acc, xs):
    gw, gm = _terms(m, *xs)
    return jax.tree.map(jnp.add, acc, gm), gw

  k = m.num_components
  zero = (jax.tree.map(jnp.zeros_like, m), tuple(jnp.zeros((k,), jnp.float32) for _ in range(3)))
  gm, gws = lax.scan(body, zero, (blocks, vblocks))
  return gws.reshape(-1)[:n].reshape(w.shape), gm


def _hyper_cost(m: Mixture, precision_prior, zero_precision_prior, zero_weight_prior,
                learn_zero_weight: bool) -> jax.Array:
  """−log of the hyper-priors (up to constants): Gamma on each λ_j, Beta on π_0."""
  gamma = jnp.asarray(m.log_precisions, jnp.float32)
  k = gamma.shape[0]
  is_zero = (jnp.arange(k) == 0) if m.has_zero else jnp.zeros((k,), bool)
  cost = jnp.zeros((), jnp.float32)
  for prior, sel in ((precision_prior, ~is_zero), (zero_precision_prior, is_zero)):
    if prior is not None:
      a, b = prior
      term = -(a - 1.0) * gamma + b * jnp.exp(gamma)
      cost = cost + jnp.sum(jnp.where(sel, term, 0.0))
  if learn_zero_weight and m.has_zero and zero_weight_prior is not None and np.shape(m.free_means)[0] > 0:
    a, b = zero_weight_prior
    z = jnp.asarray(m.zero_logit, jnp.float32)
    cost = cost - (a - 1.0) * jax.nn.log_sigmoid(z) - (b - 1.0) * jax.nn.log_sigmoid(-z)
  return cost


# ----------------------------------------------------------------------------
# The transform.


def mixture_prior(
    num_components: int = 16,
    strength: ScalarOrSchedule = 1e-4,
    *,
    zero_component: bool = True,
    zero_weight: float = 0.99,
    learn_zero_weight: bool = False,
    zero_weight_prior: tuple[float, float] | None = None,
    precision_prior: tuple[float, float] | None = None,
    zero_precision_prior: tuple[float, float] | None = None,
    init: str = "range",
    mixture_optimizer: optax.GradientTransformation | None = None,
    mixture_update: str = "gradient",
    mask: Any = None,
    chunk_size: int | None = None,
    key: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Soft weight sharing: a learned mixture-of-Gaussians prior on the weights.

  With the mixture p(w) = Π_i Σ_j π_j N(w_i | μ_j, 1/λ_j) (see
  :class:`~softshare_jax.Mixture`), ``update`` adds to the incoming updates

      strength · ∂/∂w [−Σ_i log p(w_i)] = strength · Σ_j r_ij λ_j (w_i − μ_j)

  (r_ij the responsibilities), i.e. it acts like ``optax.add_decayed_weights``:
  place it BEFORE the optimizer, ``optax.chain(ss.mixture_prior(...),
  optax.adam(lr))``. ``strength`` is the weight of the SUMMED negative log prior
  against a MEAN data loss: τ/N in Ullrich et al.'s L = L_E + τ L_C with a
  summed L_E over N training examples. The right value depends on N and the
  mixture update; measured here: about 3e-6 (≈ 5e-3/N) for LeNet-300-100 on
  4000 MNIST images (``benchmarks/compress_mnist.py``; 3e-5 and up destroyed
  accuracy), 2e-4 for the digits MLP with ``"em"`` (``benchmarks/demo.py``).

  The weights' gradient uses the mixture as it is BEFORE this step; then the
  mixture moves:

  - ``mixture_update="gradient"``: ``mixture_optimizer`` is applied to the
    gradient w.r.t. the mixture's free parameters (``free_means``,
    ``log_precisions``, ``logits``; ``zero_logit`` only when
    ``learn_zero_weight``) of

        strength · [−Σ_i log p(w_i) − log p(λ) − log p(π_0)],

    where a Gamma(α, β) ``precision_prior`` (``zero_precision_prior`` for the
    zero component) adds −(α−1)γ_j + βλ_j per component (γ = log λ), and a
    Beta(a, b) ``zero_weight_prior`` adds −(a−1) log π_0 − (b−1) log(1−π_0).
    The hyper-priors are scaled by ``strength`` like the data term, so the
    fixed point is the MAP mixture that ``"em"`` estimates. Log-precisions are
    clipped to ±60 afterwards. The default optimizer is Adam with rates 1e-4
    (means), 3e-3 (log-precisions) and 3e-3 (logits), as in Ullrich's tutorial.
  - ``mixture_update="em"``: one undamped :func:`~softshare_jax.em_step` on the
    masked weights (with the precision priors; ``zero_weight_prior`` is not
    used). ``mixture_optimizer`` is ignored.

  One mixture is shared by all masked leaves (default: floating-point leaves
  with ndim >= 2, i.e. kernels, not biases or norm scales). The mixture is
  initialised from the masked params with :func:`~softshare_jax.init_mixture`
  (``num_components`` free components, plus the zero component when
  ``zero_component``). Under ``jax.ShapeDtypeStruct`` params ``init`` returns a
  placeholder mixture of the right structure. Large leaves are evaluated
  ``chunk_size`` weights at a time (default 2**16), so the extra memory of the
  weights' gradient is O(chunk_size × K), not O(#weights × K); the ``"em"``
  update is not chunked. The math runs in float32; the updates keep their
  dtypes.

  Args:
    num_components: F >= 1, the number of free components.
    strength: >= 0, a float or an optax schedule of the step count.
    zero_component: add Ullrich's zero component (μ_0 = 0).
    zero_weight: its initial proportion π_0 in (0, 1).
    learn_zero_weight: learn π_0 (otherwise it stays fixed).
    zero_weight_prior: None or a Beta prior (a, b) on π_0, a, b > 0.
    precision_prior: None or a Gamma prior (α, β) on the free precisions.
    zero_precision_prior: None or a Gamma prior (α, β) on the zero precision.
    init: ``"range"``, ``"quantile"`` or ``"kmeans++"`` (needs ``key``).
    mixture_optimizer: an Optax transformation for the mixture's parameters.
    mixture_update: ``"gradient"`` or ``"em"``.
    mask: which leaves (a pytree of bools or a callable, as ``optax.masked``).
    chunk_size: weights per chunk (None: 2**16).
    key: a PRNG key, for ``init="kmeans++"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`MixturePriorState`; ``update`` needs ``params``. Read the mixture
    with :func:`get_mixture`. Under ``optax.inject_hyperparams`` mark the int
    ``num_components`` (and ``chunk_size``) static.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import softshare_jax as ss
    >>> params = {"w": jnp.array([[-0.5, -0.49], [0.49, 0.5]]), "b": jnp.zeros(2)}
    >>> tx = optax.chain(ss.mixture_prior(2, 1e-2, zero_component=False), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.zeros_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> ss.get_mixture(state).means.round(2)
    Array([-0.5,  0.5], dtype=float32)

    A separate mixture per group of layers, with ``optax.partition``:

    >>> tx = optax.chain(
    ...     optax.partition({"a": ss.mixture_prior(2, zero_component=False),
    ...                      "b": ss.mixture_prior(4)},
    ...                     {"w": "a", "b": "b"}),
    ...     optax.adam(1e-3))
    >>> state = tx.init({"w": jnp.ones((2, 2)), "b": jnp.ones((3, 3))})
    >>> ss.get_mixture(state, 0).num_components, ss.get_mixture(state, 1).num_components
    (2, 5)
  """
  if isinstance(num_components, bool) or not isinstance(num_components, (int, np.integer)) or num_components < 1:
    raise ValueError(f"num_components must be an int >= 1, got {num_components!r}.")
  _checks.check_nonnegative("strength", strength)
  if not isinstance(zero_weight, jax.core.Tracer):
    try:
      zw = float(zero_weight)
    except (TypeError, ValueError):
      zw = float("nan")
    if not 0.0 < zw < 1.0:
      raise ValueError(f"zero_weight must be in (0, 1), got {zero_weight!r}.")
  zero_weight_prior = _check_pair("zero_weight_prior", zero_weight_prior)
  precision_prior = _check_pair("precision_prior", precision_prior)
  zero_precision_prior = _check_pair("zero_precision_prior", zero_precision_prior)
  if init not in mixture_lib._INITS:  # pylint: disable=protected-access
    raise ValueError(f"init must be one of {mixture_lib._INITS}, got {init!r}.")  # pylint: disable=protected-access
  if init == "kmeans++" and key is None:
    raise ValueError("key is required for init='kmeans++' (a jax.random key).")
  if mixture_update not in _UPDATES:
    raise ValueError(f"mixture_update must be one of {_UPDATES}, got {mixture_update!r}.")
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                 or chunk_size < 1):
    raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}.")
  if mixture_optimizer is not None and not (hasattr(mixture_optimizer, "init")
                                            and hasattr(mixture_optimizer, "update")):
    raise ValueError(f"mixture_optimizer must be an Optax transformation, got {mixture_optimizer!r}.")
  chunk = int(chunk_size or _DEFAULT_CHUNK)
  use_em = mixture_update == "em"
  em_priors = (mixture_lib._prior_terms(precision_prior, "precision_prior")  # pylint: disable=protected-access
               + mixture_lib._prior_terms(zero_precision_prior, "zero_precision_prior"))  # pylint: disable=protected-access
  inner = optax.identity() if use_em else (mixture_optimizer or _default_mixture_optimizer())

  def masked_leaves(params):
    keep = masks.resolve_mask(mask, params, masks.is_kernel_leaf)
    return [p for p, on in zip(jax.tree.leaves(params), jax.tree.leaves(keep)) if on]

  def new_mixture(weights):
    if not weights or any(isinstance(x, jax.ShapeDtypeStruct) for x in weights):
      # No values: a placeholder with the right structure, shapes and dtypes.
      return mixture_lib.init_mixture(jnp.zeros((1,), jnp.float32), int(num_components),
                                      zero_component=zero_component, zero_weight=zero_weight)
    return mixture_lib.init_mixture([jnp.asarray(x, jnp.float32) for x in weights], int(num_components),
                                    zero_component=zero_component, zero_weight=zero_weight,
                                    init=init, key=key)

  def init_fn(params):
    m = new_mixture(masked_leaves(params))
    inner_state = optax.EmptyState() if use_em else inner.init(m)
    return MixturePriorState(count=jnp.zeros([], jnp.int32), mixture=m, inner_state=inner_state)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("mixture_prior needs params: call update(updates, state, params).")
    s = strength(state.count) if callable(strength) else strength
    # One compiled function (eager calls would dispatch many small ops).
    return core(updates, state, params, jnp.asarray(s, jnp.float32))

  @jax.jit
  def core(updates, state, params, s):
    m = state.mixture
    keep = masks.resolve_mask(mask, params, masks.is_kernel_leaf)
    u_leaves, treedef = jax.tree.flatten(updates, is_leaf=lambda x: x is None)
    p_leaves = treedef.flatten_up_to(params)
    k_leaves = treedef.flatten_up_to(keep)

    k = m.num_components
    totals = (jax.tree.map(jnp.zeros_like, m), tuple(jnp.zeros((k,), jnp.float32) for _ in range(3)))
    weights = []
    out = []
    for u, p, on in zip(u_leaves, p_leaves, k_leaves):
      if not on:
        out.append(u)
        continue
      w = jnp.asarray(p).astype(jnp.float32)
      weights.append(w)
      gw, terms = _leaf_terms(m, w, chunk)
      totals = jax.tree.map(jnp.add, totals, terms)
      out.append(None if u is None else (u.astype(jnp.float32) + s * gw).astype(u.dtype))
    new_updates = treedef.unflatten(out)

    inner_state = state.inner_state
    grad_m, stats = totals
    if weights and use_em:
      f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
      m = mixture_lib.em_from_statistics(m, stats, *map(f32, em_priors), f32(0.0), learn_zero_weight)
    elif weights:
      g_hyper = jax.grad(lambda mm: _hyper_cost(mm, precision_prior, zero_precision_prior,
                                                zero_weight_prior, learn_zero_weight))(m)
      grads = jax.tree.map(lambda a, b: s * (a + b), grad_m, g_hyper)
      if not learn_zero_weight:
        grads = Mixture(grads.free_means, grads.log_precisions, grads.logits,
                        jnp.zeros_like(grads.zero_logit), grads.has_zero)
      steps, inner_state = inner.update(grads, inner_state, m)
      m = optax.apply_updates(m, steps)
      m = Mixture(
          free_means=jnp.asarray(m.free_means, jnp.float32),
          log_precisions=jnp.clip(jnp.asarray(m.log_precisions, jnp.float32),
                                  -mixture_lib._MAX_LOG_PRECISION,  # pylint: disable=protected-access
                                  mixture_lib._MAX_LOG_PRECISION),  # pylint: disable=protected-access
          logits=jnp.asarray(m.logits, jnp.float32),
          zero_logit=(jnp.asarray(m.zero_logit, jnp.float32) if learn_zero_weight
                      else state.mixture.zero_logit),
          has_zero=m.has_zero,
      )
    return new_updates, MixturePriorState(count=optax.safe_increment(state.count), mixture=m,
                                           inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def get_mixture(opt_state: Any, index: int = 0) -> Mixture:
  """The mixture of a :func:`mixture_prior` found anywhere in an optimizer state.

  Walks the state pytree (a chain, ``optax.partition``/``multi_transform``,
  ``optax.masked``, ``optax.inject_hyperparams``, ``optax.MultiSteps``, ...)
  for :class:`MixturePriorState` nodes, in ``jax.tree`` leaf order.

  Args:
    opt_state: an optimizer state.
    index: which one when there are several (default: the first).

  Returns:
    Its :class:`~softshare_jax.Mixture`.

  Raises:
    ValueError: if there is none, or ``index`` is out of range.
  """
  found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, MixturePriorState))
           if isinstance(x, MixturePriorState)]
  if not found:
    raise ValueError("opt_state holds no MixturePriorState: was the optimizer built with ss.mixture_prior?")
  if not -len(found) <= index < len(found):
    raise ValueError(f"index {index} is out of range: opt_state holds {len(found)} mixture prior(s).")
  return found[index].mixture
