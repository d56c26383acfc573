"""Soft weight sharing as an Optax transform (Nowlan & Hinton 1992; Ullrich et al. 2017).

:func:`mixture_prior` adds the gradient of a learned mixture-of-Gaussians prior
on the weights to the incoming updates and moves the mixture at every step.
It is wiring: the arguments become a frozen :class:`_PriorConfig`, and each
step is three short pure functions over the mixture math of
:mod:`softshare_jax.mixture` (docs/design.md §4.1):

1. :func:`_accumulate`: one pass over all masked leaves (shape-keeping blocks,
   so sharded leaves stay on their devices) gives the weights' gradient and
   the mixture's sufficient statistics;
2. :func:`_em_update` or :func:`_gradient_update`: the mixture moves from the
   statistics alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softshare_jax import checks
from softshare_jax import masks
from softshare_jax.mixture import em
from softshare_jax.mixture import hyper
from softshare_jax.mixture import init as mixture_init
from softshare_jax.mixture import model
from softshare_jax.mixture import statistics
from softshare_jax.mixture.model import Mixture

_UPDATES = ("gradient", "em")
# What optax.inject_hyperparams must leave alone: ints that set shapes, and the mask (a callable
# mask would otherwise be taken for a schedule and called with the step count).
_STATIC_ARGS = ("num_components", "chunk_size", "mask")
_INJECT_HINT = ("under optax.inject_hyperparams, ints and callable masks must be static arguments: "
                f"optax.inject_hyperparams(ss.mixture_prior, static_args={_STATIC_ARGS!r}); optax calls a "
                "callable mask that is not static with the step count instead of the params")


def _check_static(num_components: Any, chunk_size: Any, mask: Any) -> None:
  """The errors of arguments that ``optax.inject_hyperparams`` turned into hyperparameters.

  It makes an int an array, and calls a callable mask with the step count
  (a scalar) and passes on what that returns: for a mask written over the
  params' leaves (``lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)``)
  that is a single ``False``, which would select no leaf and leave the prior
  silently off. A mask that is a single ``False`` or a traced value is
  therefore refused, with the fix.
  """
  for name, value in (("num_components", num_components), ("chunk_size", chunk_size)):
    if isinstance(value, (jax.Array, np.ndarray)):
      raise ValueError(f"{name} must be a Python int, got {value!r}: {_INJECT_HINT}.")
  if checks.is_traced(mask):
    raise ValueError(f"mask must be a pytree of bools or a callable, got the traced value {mask!r}: "
                     f"{_INJECT_HINT}.")
  scalar_bool = isinstance(mask, (bool, np.bool_)) or (
      isinstance(mask, (jax.Array, np.ndarray)) and mask.shape == () and mask.dtype == np.bool_)
  if scalar_bool and not bool(mask):
    raise ValueError(f"mask={mask!r} selects no leaf, so mixture_prior would do nothing. If the mask is a "
                     f"callable passed through optax.inject_hyperparams: {_INJECT_HINT}.")


class MixturePriorState(NamedTuple):
  """State of :func:`mixture_prior`.

  Attributes:
    count: the step count (for a ``strength`` schedule).
    mixture: the current :class:`~softshare_jax.Mixture` (float32).
    inner_state: the mixture optimizer's state (``optax.EmptyState()`` for EM).
  """

  count: jax.Array
  mixture: Mixture
  inner_state: optax.OptState


def mixture_adam(means: float = 1e-4, log_precisions: float = 3e-3, logits: float = 3e-3, *,
                 b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam for a :class:`~softshare_jax.Mixture`, one learning rate per kind of parameter.

  The default ``mixture_optimizer`` of :func:`mixture_prior`: Ullrich et al.'s
  tutorial rates, 1e-4 for the means and 3e-3 for the log-precisions and the
  mixing logits (the zero component's logit included).

  Args:
    means: the learning rate of the free means.
    log_precisions: the learning rate of the log-precisions γ.
    logits: the learning rate of the mixing logits η and ζ.
    b1, b2, eps: Adam's moment decays and epsilon, as ``optax.adam``.

  Returns:
    An ``optax.GradientTransformation`` over :class:`~softshare_jax.Mixture` trees.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> tx = ss.mixture_adam(means=1e-3)
    >>> m = ss.init_mixture(jnp.linspace(-1.0, 1.0, 9), 2)
    >>> m.free_means
    Array([-1.,  1.], dtype=float32)
    >>> steps, _ = tx.update(m, tx.init(m))   # with m as the gradient: Adam's first step is -rate * sign
    >>> steps.free_means.round(4)
    Array([ 0.001, -0.001], dtype=float32)
    >>> tx = ss.mixture_prior(8, 1e-4, mixture_optimizer=ss.mixture_adam(means=3e-4))
  """
  for name, rate in (("means", means), ("log_precisions", log_precisions), ("logits", logits)):
    checks.check_nonnegative(name, rate)

  def scale(u, params):
    del params
    return dataclasses.replace(u, free_means=-means * u.free_means,
                               log_precisions=-log_precisions * u.log_precisions,
                               logits=-logits * u.logits, zero_logit=-logits * u.zero_logit)

  return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), optax.stateless(scale))


@dataclasses.dataclass(frozen=True, eq=False)
class _PriorConfig:
  """The checked arguments of :func:`mixture_prior`."""

  num_components: int
  zero_component: bool
  zero_weight: Any
  learn_zero_weight: bool
  zero_weight_prior: Any
  precision_prior: Any
  zero_precision_prior: Any
  init: str
  key: Any
  use_em: bool
  mask: Any
  chunk: int | None

  def masked(self, params: Any) -> Any:
    """The mask as a pytree of bools (default: kernels)."""
    return masks.resolve_mask(self.mask, params, masks.is_kernel_leaf)

  def new_mixture(self, weights: list) -> Mixture:
    """The starting mixture for the masked leaves; a placeholder when they have no values."""
    kwargs = dict(zero_component=self.zero_component, zero_weight=self.zero_weight, name="params")
    if not weights or any(isinstance(x, jax.ShapeDtypeStruct) for x in weights):
      return mixture_init.initial_mixture(jnp.zeros((1,), jnp.float32), self.num_components, init="range",
                                   key=None, **kwargs)
    return mixture_init.initial_mixture([jnp.asarray(x, jnp.float32) for x in weights], self.num_components,
                                 init=self.init, key=self.key, **kwargs)


def _accumulate(cfg: _PriorConfig, m: Mixture, updates: Any, params: Any,
                s: jax.Array) -> tuple[Any, statistics.Statistics, bool]:
  """Adds ``s · ∂/∂w [−log p(w)]`` to the masked updates; sums the statistics.

  Returns the new updates, the statistics of all masked weights, and whether
  any leaf was masked in. One pass over all masked leaves
  (``statistics.tree_pass``): each leaf in its own shape (a large one in
  blocks), so that it keeps its sharding. A weight the mixture cannot
  evaluate (NaN, ±Inf, or a log-joint of −inf for every component) adds
  nothing to its update and is left out of the statistics
  (``statistics.weight_pass``).
  """
  u_leaves, treedef = jax.tree.flatten(updates, is_leaf=lambda x: x is None)
  p_leaves = treedef.flatten_up_to(params)
  on_leaves = treedef.flatten_up_to(cfg.masked(params))
  picked = [i for i, on in enumerate(on_leaves) if on]
  grads, total = statistics.tree_pass(m, [jnp.asarray(p_leaves[i]) for i in picked], cfg.chunk)
  out = list(u_leaves)
  for i, grad_w in zip(picked, grads):
    u = u_leaves[i]
    out[i] = None if u is None else (u.astype(jnp.float32) + s * grad_w).astype(u.dtype)
  return treedef.unflatten(out), total, bool(picked)


def _em_update(cfg: _PriorConfig, m: Mixture, stats: statistics.Statistics) -> Mixture:
  """One undamped EM step from the statistics (the precision priors apply)."""
  pp, zp = hyper.resolve_precision_priors(m, cfg.precision_prior, cfg.zero_precision_prior,
                                          hyper.weight_variance(m, stats))
  return em.m_step(m, stats, hyper.PrecisionPriors.of(pp, zp), 0.0, cfg.learn_zero_weight)


def _gradient_update(cfg: _PriorConfig, inner: optax.GradientTransformation, m: Mixture,
                     stats: statistics.Statistics, inner_state: Any, s: jax.Array) -> tuple[Mixture, Any]:
  """One step of ``inner`` on ``s · ∂/∂mixture [−Σ log p(w) − log hyper-priors]``."""
  pp, zp = hyper.resolve_precision_priors(m, cfg.precision_prior, cfg.zero_precision_prior,
                                          hyper.weight_variance(m, stats))
  g_hyper = jax.grad(hyper.hyper_cost)(m, pp, zp, cfg.zero_weight_prior, cfg.learn_zero_weight)
  grads = jax.tree.map(lambda a, b: s * (a + b), statistics.mixture_gradient(m, stats), g_hyper)
  if not cfg.learn_zero_weight:
    grads = dataclasses.replace(grads, zero_logit=jnp.zeros_like(grads.zero_logit))
  steps, inner_state = inner.update(grads, inner_state, m)
  new = model.as_float32(optax.apply_updates(m, steps))
  new = dataclasses.replace(
      new, log_precisions=jnp.clip(new.log_precisions, -model.MAX_LOG_PRECISION, model.MAX_LOG_PRECISION),
      zero_logit=new.zero_logit if cfg.learn_zero_weight else m.zero_logit)
  return new, inner_state


def mixture_prior(
    num_components: int = 16,
    strength: optax.ScalarOrSchedule = 1e-6,
    *,
    zero_component: bool = True,
    zero_weight: float = 0.99,
    learn_zero_weight: bool = False,
    zero_weight_prior: tuple[float, float] | None = None,
    precision_prior: tuple[float, float] | str | None = "auto",
    zero_precision_prior: tuple[float, float] | str | None = "auto",
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
  summed L_E over N training examples.

  Setting ``strength`` (the default, 1e-6, is deliberately weak: a prior
  that cannot hurt, not one tuned for a task). With N training examples and a
  mean loss, strength = c/N. For regularization (Nowlan & Hinton), the
  Bayesian value is c = 1 for a mean negative log-likelihood (cross-entropy)
  and c = 2σ² for a mean squared error with noise variance σ² (their eq. 4);
  tune c on validation data around it (``benchmarks/generalization.py`` chose
  c from 0.01 to 1 on ~100-example problems). For compression, c ≈ 0.005-0.05
  (the recipe below: 0.012). Larger values collapse the weights onto the
  components before the data has shaped them: the old default 1e-4, about
  1000 × Ullrich's τ/N at N = 60000, and 3e-5 on the digits MLP
  (N = 1347) destroyed accuracy. ``num_components`` counts the FREE
  components: with ``zero_component=True`` the mixture has
  ``num_components + 1`` (Ullrich's tutorial counts the zero component in
  its 16 or 17).

  Degenerate components. A mixture's likelihood is unbounded: a component
  sitting on one weight gains without limit as its σ → 0, and on a small
  network the flat-prior transform finds that maximum (components of σ ≈ 0
  holding one weight each, ``tests/test_degenerate.py``). The default
  ``precision_prior="auto"`` (and ``zero_precision_prior="auto"``) is Fraley
  & Raftery's (2007) weakly informative prior for 1-D mixtures,
  λ_j ~ Gamma(3/2, var(w)/(2K²)), var(w) the variance of the masked weights
  at each step (K all components): it bounds σ_j ≥ std(w)/(K √2 √(N_j + 1))
  for a component of mass N_j, and is negligible for components holding many
  weights. ``None`` is the flat prior (the maximum likelihood of earlier
  versions); an explicit (α, β), such as the recipe's, replaces it.

  The compression recipe (``benchmarks/recipe.py``, measured in
  ``benchmarks/results/recipe.json``). Start from a PRETRAINED model, trained
  as usual without the prior, then:

  1. retrain it for about 2000 steps with::

         optax.chain(ss.mixture_prior(16, 0.012 / N, zero_weight=0.99, mixture_update="em",
                                      precision_prior=(250, 0.1), zero_precision_prior=(5000, 2)),
                     optax.adam(1e-3))

     (N training examples, a mean loss; the Gamma priors are Ullrich's);
  2. ``merged = ss.merge_components(ss.get_mixture(state), 1e-2)`` and
     ``q = ss.quantize(params, merged)``;
  3. fine-tune about 200 steps from ``ss.dequantize(q)`` with
     ``optax.chain(ss.keep_clusters(q), optax.adam(1e-3))``;
  4. read ``ss.compression_report(q, params=params, mixture=merged)``, which
     warns when quantizing moved the weights far, and measure the accuracy.

  ``zero_weight`` (π_0, fixed) is about the share of the weights that end
  at exactly zero: it trades size for accuracy. Measured (test accuracy
  pretrained → after fine-tuning, CSR ratio): LeNet-300-100 on 4000 MNIST
  images (strength 3e-6, one seed): 93.8 → 94.3 %, 41.9x; the digits MLP
  (N = 1347, strength 9e-6, 3 seeds): 97.6 → 94.7 %, 16.2x at π_0 = 0.99,
  96.5 %, 8.9x at 0.95 and 97.0 %, 6.6x at 0.9 (94.4 %, 15.8x from an
  SGD-pretrained model). The strength is a per-model setting, not a law:
  0.012/N is LeNet-300-100's, and on the digits MLP every c = strength × N
  from 0.003 to 0.05 gave the same accuracy within 1-2 points, with N = 1347
  and N = 673 alike, so these runs cannot tell c/N from a constant. A larger
  ratio on LeNet-300-100 (69.5x at +0.9 points of error, +0.4 after
  fine-tuning, 3 seeds) came from gradient mixture updates at faster rates,
  ``mixture_optimizer=ss.mixture_adam(1e-3, 1e-2, 1e-2)``
  (``benchmarks/compress_mnist.py``); on the digits MLP that setting
  quantized to 79 ± 10 % (86 % after fine-tuning). What failed (digits
  MLP, trained from its initialization): this function's defaults at
  strength 3e-5 with Adam 3e-3 quantized to 45 ± 19 % at 31x, and
  ``compression_report`` warned.

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
    (means), 3e-3 (log-precisions) and 3e-3 (logits), as in Ullrich's tutorial
    (:func:`mixture_adam`, which takes other rates).
  - ``mixture_update="em"``: one undamped :func:`~softshare_jax.em_step` on the
    masked weights (with the precision priors; ``zero_weight_prior`` is not
    used). ``mixture_optimizer`` is ignored.

  One mixture is shared by all masked leaves (default: floating-point leaves
  with ndim >= 2, i.e. kernels, not biases or norm scales). The mixture is
  initialised from the masked params with :func:`~softshare_jax.init_mixture`
  (``num_components`` free components, plus the zero component when
  ``zero_component``). Under ``jax.ShapeDtypeStruct`` params ``init`` returns a
  placeholder mixture of the right structure. Large leaves are evaluated
  ``chunk_size`` weights at a time (default: on CPU 2**16, fewer when
  K > 4 so that chunk × K ≤ 2**18; on GPU/TPU chunk × K ≤ 2**26, so most
  leaves in one go), so the extra memory of both updates is
  O(chunk_size × K), not O(#weights × K): the weights' gradient, the
  mixture's gradient and the ``"em"`` update all come from the same chunked
  pass (the sufficient statistics of docs/design.md §4.1), one pass over all
  masked leaves, leaf by leaf. The pass
  keeps each leaf's shape, so with params sharded over a mesh (FSDP, tensor
  parallel) each device evaluates its own weights, the updates keep the
  params' sharding, and only K-vectors of statistics are summed across
  devices. The math runs in float32; the updates keep their dtypes.

  Broken weights. A weight the mixture cannot evaluate, NaN or ±Inf, above
  1e12 in magnitude (where float32 sums of r·(w − μ)² would overflow), or so
  far from every component that its log-joint is −inf for all of them
  (λ_j (w − μ_j)² overflows float32), gets no prior gradient:
  its update is passed through unchanged, and it is left out of the
  mixture's statistics. So the other weights' updates and the mixture are
  those of the healthy weights alone, and the mixture (and its optimizer's
  state) stays finite. Passing the update through, rather than making it NaN,
  keeps the prior from breaking a weight the loss may still bring back; a
  NaN weight stays NaN by itself, visible in the params. ``init`` ignores NaN
  and Inf weights, and raises a ``ValueError`` naming ``params`` when no
  masked weight is finite.

  ``strength`` at run time. A value known at construction is checked then.
  A schedule's value is checked at each step: a ``ValueError`` when ``update``
  runs eagerly; under ``jit`` (or ``optax.inject_hyperparams``) it is a
  ``jax.experimental.checkify`` check, reported when the step is wrapped in
  ``checkify.checkify`` (``err, out = checkify.checkify(step)(...);
  err.throw()``) and free otherwise. Unchecked, a NaN strength makes every
  masked update NaN (and, in ``"gradient"`` mode, the mixture and its
  optimizer's state NaN for good); a negative one pushes the weights away
  from the means and, in ``"gradient"`` mode, the mixture away from the
  weights.

  Under ``optax.inject_hyperparams`` (to schedule or change ``strength``),
  pass ``static_args=('num_components', 'chunk_size', 'mask')``: optax turns
  ints into arrays, and takes a callable ``mask`` for a schedule and calls it
  with the step count instead of the params. A mask by path then fails inside
  your own function (an ``IndexError`` on the empty path); a mask by leaf
  returns a single ``False``, which this factory refuses (a ``ValueError``
  that names ``static_args``) rather than silently masking every leaf out::

      tx = optax.inject_hyperparams(
          ss.mixture_prior, static_args=('num_components', 'chunk_size', 'mask'))(
          num_components=16, strength=schedule, mask=lambda p: ...)

  Args:
    num_components: F >= 1, the number of free components (the zero
      component, when there is one, is extra).
    strength: >= 0, a float or an optax schedule of the step count.
    zero_component: add Ullrich's zero component (μ_0 = 0).
    zero_weight: its initial proportion π_0 in (0, 1).
    learn_zero_weight: learn π_0 (otherwise it stays fixed).
    zero_weight_prior: None or a Beta prior (a, b) on π_0, a, b > 0.
    precision_prior: ``"auto"`` (Gamma(3/2, var(w)/(2K²)), see above), None
      (flat) or a Gamma prior (α, β) on the free precisions, α > 0, β >= 0.
    zero_precision_prior: the same for the zero component's precision.
    init: ``"range"``, ``"quantile"`` or ``"kmeans++"`` (needs ``key``).
    mixture_optimizer: an Optax transformation for the mixture's parameters.
    mixture_update: ``"gradient"`` or ``"em"``.
    mask: which leaves (a pytree of bools, a prefix of one such as
      ``{"encoder": True}``, or a callable, as ``optax.masked``); selecting
      a leaf that is not a floating-point array is a ``ValueError``, and so
      is a single ``False``, which selects no leaf.
    chunk_size: weights per chunk (None: per platform, see above).
    key: a PRNG key, for ``init="kmeans++"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`MixturePriorState`; ``update`` needs ``params``. Read the mixture
    with :func:`get_mixture`.

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
  _check_static(num_components, chunk_size, mask)
  f = mixture_init.check_init_args(num_components, zero_weight, init, key)
  checks.check_nonnegative("strength", strength)
  cfg = _PriorConfig(
      num_components=f, zero_component=bool(zero_component), zero_weight=zero_weight,
      learn_zero_weight=bool(learn_zero_weight),
      zero_weight_prior=hyper.check_beta_prior("zero_weight_prior", zero_weight_prior),
      precision_prior=hyper.check_precision_prior("precision_prior", precision_prior),
      zero_precision_prior=hyper.check_precision_prior("zero_precision_prior", zero_precision_prior),
      init=init, key=key, use_em=checks.check_choice("mixture_update", mixture_update, _UPDATES) == "em",
      mask=mask, chunk=None if chunk_size is None else checks.check_int("chunk_size", chunk_size))
  if mixture_optimizer is not None and not (hasattr(mixture_optimizer, "init")
                                            and hasattr(mixture_optimizer, "update")):
    raise ValueError(f"mixture_optimizer must be an Optax transformation, got {mixture_optimizer!r}.")
  inner = optax.identity() if cfg.use_em else (mixture_optimizer or mixture_adam())

  def init_fn(params):
    on = jax.tree.leaves(cfg.masked(params))
    m = cfg.new_mixture([p for p, keep in zip(jax.tree.leaves(params), on) if keep])
    inner_state = optax.EmptyState() if cfg.use_em else inner.init(m)
    return MixturePriorState(count=jnp.zeros([], jnp.int32), mixture=m, inner_state=inner_state)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params("mixture_prior", params)
    s = jnp.asarray(checks.check_schedule_value("strength", checks.value_at(strength, state.count)),
                    jnp.float32)
    return step(updates, state, params, s)

  @jax.jit  # One compiled function: eager calls would dispatch many small ops.
  def step(updates, state, params, s):
    m, inner_state = state.mixture, state.inner_state
    updates, stats, seen = _accumulate(cfg, m, updates, params, s)
    if seen and cfg.use_em:
      m = _em_update(cfg, m, stats)
    elif seen:
      m, inner_state = _gradient_update(cfg, inner, m, stats, inner_state, s)
    return updates, MixturePriorState(optax.safe_increment(state.count), m, inner_state)

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
  mixture = found[index].mixture
  # nnx.Optimizer keeps its state's arrays in Flax Variables (OptArray): give back the arrays inside.
  fields, treedef = jax.tree_util.tree_flatten(mixture, is_leaf=lambda x: x is not mixture)
  if all(isinstance(f, (jax.Array, np.ndarray)) for f in fields):
    return mixture
  return treedef.unflatten([jnp.asarray(f) for f in fields])
