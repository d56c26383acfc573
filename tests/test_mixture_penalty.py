"""``ss.mixture_penalty``: the mixture prior as a loss term, against the transform and a float64 reference."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import expit
from scipy.special import logsumexp

import softshare_jax as ss

LOG_2PI = math.log(2 * math.pi)
FIELDS = ("free_means", "log_precisions", "logits")


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"kernel": jnp.asarray(rng.normal(0.0, 0.3, (12, 9)), jnp.float32),
          "conv": jnp.asarray(rng.normal(0.0, 0.1, (3, 3, 2, 4)), jnp.float32),
          "bias": jnp.asarray(rng.normal(0.0, 0.5, (9,)), jnp.float32)}


def masked_weights(params):
  return np.concatenate([np.ravel(params["kernel"]), np.ravel(params["conv"])]).astype(np.float64)


def perturbed_mixture(params, k, zero_component, seed=3):
  """The transform's starting mixture, moved off its symmetric start so that every gradient is nonzero."""
  m = ss.init_mixture([params["kernel"], params["conv"]], k, zero_component=zero_component)
  rng = np.random.default_rng(seed)
  bump = lambda x, s: jnp.asarray(np.asarray(x) + rng.normal(0, s, np.shape(x)), jnp.float32)  # noqa: E731
  return dataclasses.replace(m, free_means=bump(m.free_means, 0.02), log_precisions=bump(m.log_precisions, 0.3),
                             logits=bump(m.logits, 0.3), zero_logit=bump(m.zero_logit, 0.3))


def ref_penalty(w, m, prior=None, zero_prior=None, beta_prior=None):
  """−Σ log p(w) + the hyper-priors' cost, float64 NumPy/SciPy, from the mixture's free parameters."""
  w = np.asarray(w, np.float64)
  fm, gamma, logits = (np.asarray(getattr(m, f), np.float64) for f in FIELDS)
  zl = float(m.zero_logit)
  logpi = logits - logsumexp(logits)
  mu = fm
  if m.has_zero:
    mu = np.concatenate([[0.0], fm])
    logpi = np.concatenate([[np.log(expit(zl))], np.log(expit(-zl)) + logpi])
  lj = logpi + 0.5 * gamma - 0.5 * LOG_2PI - 0.5 * np.exp(gamma) * (w[:, None] - mu) ** 2
  cost = -np.sum(logsumexp(lj, axis=1))
  k = gamma.shape[0]
  for pr, idx in ((prior, np.arange(int(m.has_zero), k)), (zero_prior, np.arange(int(m.has_zero)))):
    if pr is not None:
      a, b = pr
      cost += np.sum(-(a - 1) * gamma[idx] + b * np.exp(gamma[idx]))
  if beta_prior is not None:
    a, b = beta_prior
    cost += -(a - 1) * np.log(expit(zl)) - (b - 1) * np.log(expit(-zl))
  return cost


@pytest.mark.parametrize("zero_component", [True, False])
@pytest.mark.parametrize("priors", [(None, None, None), ((3.0, 0.2), (2.0, 0.01), (3.0, 2.0))],
                         ids=["flat", "gamma-beta"])
def test_value_matches_float64_reference(zero_component, priors):
  params = make_params()
  m = perturbed_mixture(params, 4, zero_component)
  pp, zp, bp = priors
  got = ss.mixture_penalty(params, m, precision_prior=pp, zero_precision_prior=zp, zero_weight_prior=bp)
  want = ref_penalty(masked_weights(params), m, pp, zp, bp if zero_component else None)
  np.testing.assert_allclose(float(got), want, rtol=2e-6, atol=1e-4)


def test_auto_prior_is_fraley_raftery_of_the_masked_weights():
  params = make_params()
  m = perturbed_mixture(params, 4, True)
  w = masked_weights(params)
  beta = np.var(w) / (2 * m.num_components**2)
  got = ss.mixture_penalty(params, m, precision_prior="auto", zero_precision_prior="auto")
  np.testing.assert_allclose(float(got), ref_penalty(w, m, (1.5, beta), (1.5, beta)), rtol=2e-6, atol=1e-4)


def transform_step(params, m, strength, **kwargs):
  """One update of mixture_prior (SGD(1) on the mixture) from mixture ``m``: (weight updates, new mixture)."""
  tx = ss.mixture_prior(m.num_components - int(m.has_zero), strength, zero_component=m.has_zero,
                        mixture_optimizer=optax.sgd(1.0), **kwargs)
  state = tx.init(params)._replace(mixture=m)
  state = state._replace(inner_state=optax.sgd(1.0).init(m))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, new = tx.update(zeros, state, params)
  return updates, new.mixture


@pytest.mark.parametrize("zero_component", [True, False])
@pytest.mark.parametrize("priors", [dict(precision_prior=None, zero_precision_prior=None),
                                    dict(precision_prior=(3.0, 0.2), zero_precision_prior=(2.0, 0.01)),
                                    dict(precision_prior="auto", zero_precision_prior="auto")],
                         ids=["flat", "gamma", "auto"])
def test_gradients_are_the_transforms(zero_component, priors):
  params, strength = make_params(), 1e-3
  m = perturbed_mixture(params, 3, zero_component)
  updates, new = transform_step(params, m, strength, **priors)
  g_params, g_m = jax.grad(ss.mixture_penalty, argnums=(0, 1))(params, m, **priors)
  for leaf in ("kernel", "conv"):
    np.testing.assert_allclose(np.asarray(updates[leaf]) / strength, np.asarray(g_params[leaf]),
                               rtol=2e-4, atol=1e-3)
    assert np.abs(np.asarray(g_params[leaf])).max() > 1e-2
  np.testing.assert_array_equal(np.asarray(g_params["bias"]), 0.0)   # not masked by default
  for f in FIELDS:
    moved = (np.asarray(getattr(m, f)) - np.asarray(getattr(new, f))) / strength
    np.testing.assert_allclose(moved, np.asarray(getattr(g_m, f)), rtol=2e-3, atol=2e-2, err_msg=f)


def test_zero_weight_gradient_is_the_transforms_when_learned():
  params, strength = make_params(), 1e-3
  m = perturbed_mixture(params, 3, True)
  kw = dict(precision_prior=None, zero_precision_prior=None)
  _, new = transform_step(params, m, strength, learn_zero_weight=True, zero_weight_prior=(3.0, 2.0), **kw)
  g = jax.grad(ss.mixture_penalty, argnums=1)(params, m, zero_weight_prior=(3.0, 2.0), **kw)
  moved = (float(m.zero_logit) - float(new.zero_logit)) / strength
  np.testing.assert_allclose(moved, float(g.zero_logit), rtol=2e-3, atol=2e-2)
  assert abs(float(g.zero_logit)) > 0.1


def test_gradient_matches_float64_autodiff_reference():
  params = make_params()
  m = perturbed_mixture(params, 4, True)
  g = jax.grad(ss.mixture_penalty, argnums=1)(params, m, precision_prior=(3.0, 0.2))
  eps = 1e-6
  for f in FIELDS:
    x = np.asarray(getattr(m, f), np.float64)
    for i in range(x.shape[0]):
      hi, lo = x.copy(), x.copy()
      hi[i] += eps
      lo[i] -= eps
      mk = lambda v: dataclasses.replace(m, **{f: v})  # noqa: E731
      # the reference reads its parameters back as float64, so a central difference in float64 is exact enough
      fd = (ref_penalty(masked_weights(params), _F64(mk(hi)), (3.0, 0.2))
            - ref_penalty(masked_weights(params), _F64(mk(lo)), (3.0, 0.2))) / (2 * eps)
      np.testing.assert_allclose(float(g.__dict__[f][i]), fd, rtol=1e-3, atol=2e-3, err_msg=f"{f}[{i}]")


class _F64:
  """A Mixture's fields as float64 NumPy (no float32 rounding of the perturbed parameter)."""

  def __init__(self, m):
    self.has_zero = m.has_zero
    for f in (*FIELDS, "zero_logit"):
      setattr(self, f, np.asarray(getattr(m, f), np.float64))


def test_unusable_weights_add_nothing_and_get_no_gradient():
  params = make_params()
  m = perturbed_mixture(params, 3, True)
  broken = dict(params, kernel=params["kernel"].at[0, 0].set(jnp.nan).at[0, 1].set(jnp.inf).at[0, 2].set(1e20))
  clean = masked_weights(params)
  keep = np.ones(clean.size, bool)
  keep[:3] = False
  got, g = jax.value_and_grad(ss.mixture_penalty)(broken, m, precision_prior=None, zero_precision_prior=None)
  np.testing.assert_allclose(float(got), ref_penalty(clean[keep], m), rtol=2e-6, atol=1e-4)
  g = np.asarray(g["kernel"]).ravel()
  assert np.all(np.isfinite(g)) and np.all(g[:3] == 0.0)
  gm = jax.grad(ss.mixture_penalty, argnums=1)(broken, m)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(gm))


def test_large_leaf_is_chunked_and_exact():
  # K = 2000 components: chunks of 2**22 // 2000 = 2097 weights, so this leaf of 5000 is three chunks.
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(0, 1, (50, 100)), jnp.float32)}
  m = ss.init_mixture(params["w"], 2000, zero_component=False)
  got, g = jax.value_and_grad(ss.mixture_penalty)(params, m)
  w = np.ravel(params["w"]).astype(np.float64)
  np.testing.assert_allclose(float(got), ref_penalty(w, m), rtol=1e-5)
  one = ss.mixture_penalty({"w": params["w"][:1]}, m)   # a single chunk: the same per-weight sum
  np.testing.assert_allclose(float(one), ref_penalty(w[:100], m), rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(g["w"])))


def test_mask_selects_leaves_and_jit():
  params = make_params()
  m = perturbed_mixture(params, 3, False)
  f = jax.jit(lambda p, mm: ss.mixture_penalty(p, mm, mask={"kernel": True, "conv": False, "bias": True}))
  w = np.concatenate([np.ravel(params["kernel"]), np.ravel(params["bias"])])
  np.testing.assert_allclose(float(f(params, m)), ref_penalty(w, m), rtol=2e-6)


@pytest.mark.parametrize("kwargs, name", [
    (dict(precision_prior="flat"), "precision_prior"),
    (dict(zero_precision_prior=(1.0, -1.0)), "zero_precision_prior"),
    (dict(zero_weight_prior=(0.0, 1.0)), "zero_weight_prior"),
    (dict(mask={"kernel": "yes"}), "mask"),
])
def test_bad_arguments(kwargs, name):
  params = make_params()
  m = perturbed_mixture(params, 3, True)
  with pytest.raises(ValueError, match=name):
    ss.mixture_penalty(params, m, **kwargs)
  with pytest.raises(ValueError, match="mixture"):
    ss.mixture_penalty(params, {"free_means": 0})
