"""Degenerate components: under the defaults, no mixture component collapses onto a single weight.

The likelihood of a mixture is unbounded: a component whose mean sits on one
weight gains without limit as its σ → 0 (the classical degenerate maximum). On
a small network with full-batch training the flat-prior transform finds it: a
component holding one weight, its σ a few 1e-4 of the weights' spread, the
prior pinning that weight in place. ``mixture_prior``'s default precision
prior ("auto", Fraley & Raftery's Gamma(3/2, var(w)/(2K²))) bounds every σ
below by about std(w)/(K √2 √(N_j + 1)); these tests train a ~100-weight
network both ways and check that the default never collapses while the flat
prior (the old default) does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softshare_jax as ss

HIDDEN, INPUTS, N = 16, 4, 200


def problem():
  """A 4-16-1 tanh network (97 weights) and 200 examples of a smooth target with noise."""
  rng = np.random.default_rng(0)
  x = rng.normal(0, 1, (N, INPUTS)).astype(np.float32)
  y = (np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] + 0.1 * rng.normal(0, 1, N)).astype(np.float32)
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w1": jax.random.normal(k1, (INPUTS + 1, HIDDEN)) * 0.5, "w2": jax.random.normal(k2, (HIDDEN + 1,)) * 0.5}
  return jnp.asarray(x), jnp.asarray(y), params


def loss(p, x, y):
  h = jnp.tanh(x @ p["w1"][:-1] + p["w1"][-1])
  return jnp.mean(jnp.square(h @ p["w2"][:-1] + p["w2"][-1] - y))


def train(steps=3000, **prior_kwargs):
  x, y, params = problem()
  all_leaves = jax.tree.map(lambda _: True, params)
  tx = optax.chain(ss.mixture_prior(8, 1e-3, zero_component=False, mask=all_leaves, **prior_kwargs),
                   optax.adam(1e-2))
  state = tx.init(params)

  @jax.jit
  def run(params, state):
    def body(c, _):
      p, s = c
      u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (params, state), None, length=steps)[0]

  params, state = run(params, state)
  w = jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(params)])
  m = ss.get_mixture(state)
  return np.asarray(w), m


def collapsed(w, m):
  """Components with σ below 1% of the weights' spread that hold at most ~one weight (N_j < 1.5)."""
  mass = np.asarray(ss.responsibilities(m, w).sum(axis=0))
  ratio = np.asarray(m.stddevs) / np.std(w)
  return [(j, float(ratio[j]), float(mass[j])) for j in range(len(mass)) if ratio[j] < 1e-2 and mass[j] < 1.5]


@pytest.mark.parametrize("update", ["gradient", "em"])
def test_defaults_do_not_collapse(update):
  w, m = train(mixture_update=update)
  assert np.all(np.isfinite(w))
  assert collapsed(w, m) == []
  # The floor is what the prior's bound says: σ_j ≥ std(w) / (K √2 √(N_j + 1)) at N_j weights.
  mass = np.asarray(ss.responsibilities(m, w).sum(axis=0))
  floor = np.std(w) / (m.num_components * np.sqrt(2.0) * np.sqrt(mass + 1.0))
  assert np.all(np.asarray(m.stddevs) >= 0.8 * floor)


def test_the_flat_prior_collapses():
  """The old default (flat precision prior) collapses on this network: the test above can fail."""
  w, m = train(mixture_update="gradient", precision_prior=None, zero_precision_prior=None)
  assert collapsed(w, m), (np.asarray(m.stddevs) / np.std(w)).round(4)


@pytest.mark.parametrize("zero_component", [True, False])
def test_auto_prior_em_step_is_em_step_with_fraley_raftery_gamma(zero_component):
  """The default EM update is em_step under Gamma(3/2, var(w)/(2K²)), var(w) in float64 NumPy."""
  rng = np.random.default_rng(1)
  params = {"a": jnp.asarray(rng.normal(0.3, 0.7, (9, 7)), jnp.float32),
            "b": jnp.asarray(rng.normal(0, 0.2, (4, 5)), jnp.float32)}
  tx = ss.mixture_prior(3, 1e-3, mixture_update="em", zero_component=zero_component)
  state = tx.init(params)
  _, new = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  w = np.concatenate([np.ravel(params["a"]), np.ravel(params["b"])]).astype(np.float64)
  k = state.mixture.num_components
  prior = (1.5, float(np.var(w) / (2 * k**2)))
  want = ss.em_step(state.mixture, list(params.values()), precision_prior=prior, zero_precision_prior=prior)
  for got, exp in zip(jax.tree.leaves(ss.get_mixture(new)), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=2e-5, atol=2e-6)


def test_flat_and_explicit_priors_are_still_available():
  with pytest.raises(ValueError, match="precision_prior"):
    ss.mixture_prior(3, precision_prior="automatic")
  ss.mixture_prior(3, precision_prior=None, zero_precision_prior=(2.0, 0.1))
