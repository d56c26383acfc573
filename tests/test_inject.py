"""The transforms under ``optax.inject_hyperparams`` with callable masks.

``optax.inject_hyperparams`` takes every callable argument for a schedule and
calls it with the step count, unless it is named in ``static_args``; ints
become arrays. The docstrings give the ``static_args`` each transform needs;
here they are used with a callable mask, and the injected transform must give
the updates of the plain one (called without the wrapper). A mask that is
left out of ``static_args`` must not silently turn the mixture prior off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softshare_jax as ss

PRIOR_STATIC = ("num_components", "chunk_size", "mask")
PROX_STATIC = ("axis", "mask")


def make_params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
      "Dense_0": {"kernel": jnp.asarray(rng.normal(0, 1, (6, 4)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(0, 0.5, (4,)), jnp.float32)},
      "Dense_1": {"kernel": jnp.asarray(rng.normal(0, 1, (4, 3)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(0, 0.5, (3,)), jnp.float32)},
  }


def first_kernel_only(params):
  """A mask by path: called with a step count instead of params it fails in the user's code (IndexError)."""
  return jax.tree_util.tree_map_with_path(lambda path, x: path[0].key == "Dense_0" and x.ndim == 2, params)


def kernels(params):
  """A mask by leaf: called with a step count (a scalar) it returns a single False."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def run(tx, steps: int = 3):
  """Jitted steps on random updates; the updates of each step and the final state."""
  params = make_params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  outs = []
  for i in range(steps):
    u = jax.tree.map(lambda x, i=i: 0.1 * x, make_params(10 + i))
    out, state = update(u, state, params)
    outs.append(out)
    params = optax.apply_updates(params, out)
  return outs, state


def assert_same_updates(got, want, rtol=1e-6, atol=1e-7):
  for g, w in zip(got, want):
    assert jax.tree.structure(g) == jax.tree.structure(w)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def test_documented_static_args_are_in_the_docstrings():
  assert f"static_args={PRIOR_STATIC!r}" in ss.mixture_prior.__doc__


@pytest.mark.parametrize("mixture_update", ["gradient", "em"])
def test_mixture_prior_callable_mask_with_static_args_matches_plain(mixture_update):
  kwargs = dict(num_components=3, strength=optax.linear_schedule(0.05, 0.2, 3), mask=first_kernel_only,
                mixture_update=mixture_update, precision_prior=(2.0, 0.5))
  plain, plain_state = run(ss.mixture_prior(**kwargs))
  injected, inj_state = run(optax.inject_hyperparams(ss.mixture_prior, static_args=PRIOR_STATIC)(**kwargs))
  assert_same_updates(injected, plain)
  m_plain, m_inj = ss.get_mixture(plain_state), ss.get_mixture(inj_state)
  np.testing.assert_allclose(m_inj.means, m_plain.means, rtol=1e-6, atol=1e-7)
  # The mask matters: the first kernel's updates changed, the second kernel's passed through.
  first = make_params(10)
  assert np.abs(np.asarray(plain[0]["Dense_0"]["kernel"]) - 0.1 * np.asarray(first["Dense_0"]["kernel"])).max() > 1e-3
  np.testing.assert_array_equal(plain[0]["Dense_1"]["kernel"], 0.1 * first["Dense_1"]["kernel"])


def test_mixture_prior_callable_mask_not_static_is_an_error_not_a_silent_no_op():
  # optax calls the mask with the step count: a mask by leaf returns False, which would mask nothing.
  tx = optax.inject_hyperparams(ss.mixture_prior, static_args=("num_components",))(num_components=3, mask=kernels)
  with pytest.raises(ValueError, match=r"mask=False selects no leaf.*static_args=\('num_components', "
                                       r"'chunk_size', 'mask'\)"):
    tx.init(make_params())
  with pytest.raises(ValueError, match="mask=False selects no leaf"):
    ss.mixture_prior(mask=False)
  ss.mixture_prior(mask=True)  # Every float leaf: allowed.


def test_mixture_prior_int_not_static_names_static_args():
  tx = optax.inject_hyperparams(ss.mixture_prior, static_args=("mask",))(num_components=3, mask=kernels)
  with pytest.raises(ValueError, match=r"num_components must be a Python int, got Array.*static_args="):
    tx.init(make_params())


@pytest.mark.parametrize("axis", [0, None])
def test_weight_sharing_prox_callable_mask_with_static_args_matches_plain(axis):
  kwargs = dict(strength=0.5, learning_rate=optax.linear_schedule(0.1, 0.3, 3), axis=axis, mask=first_kernel_only)
  plain, _ = run(ss.weight_sharing_prox(**kwargs))
  injected, _ = run(optax.inject_hyperparams(ss.weight_sharing_prox, static_args=PROX_STATIC)(**kwargs))
  assert_same_updates(injected, plain, rtol=1e-5, atol=1e-6)
  first = make_params(10)
  assert np.abs(np.asarray(plain[0]["Dense_0"]["kernel"]) - 0.1 * np.asarray(first["Dense_0"]["kernel"])).max() > 1e-3
  np.testing.assert_array_equal(plain[0]["Dense_1"]["kernel"], 0.1 * first["Dense_1"]["kernel"])


@pytest.mark.parametrize("static_args", [(), ("quantized",)])
def test_keep_clusters_under_inject_hyperparams_matches_plain(static_args):
  # keep_clusters has no callable or int argument: it needs no static_args (naming `quantized` is harmless).
  q = ss.cluster_weights(make_params(), 3, key=jax.random.key(0))
  plain, _ = run(ss.keep_clusters(q, reduce="sum"))
  injected, _ = run(optax.inject_hyperparams(ss.keep_clusters, static_args=static_args)(q, reduce="sum"))
  assert_same_updates(injected, plain)
  # Clusters kept: the first kernel's updates take at most 3 values.
  assert np.unique(np.asarray(plain[0]["Dense_0"]["kernel"])).size <= 3


def test_chain_with_all_three_under_inject_hyperparams():
  """A learning-rate schedule injected into a chain that holds the prior and the prox, masks as callables."""
  def make(learning_rate):
    return optax.chain(
        optax.inject_hyperparams(ss.mixture_prior, static_args=PRIOR_STATIC)(num_components=3, strength=0.1,
                                                                              mask=first_kernel_only),
        optax.sgd(learning_rate),
        optax.inject_hyperparams(ss.weight_sharing_prox, static_args=PROX_STATIC)(0.5, learning_rate, axis=0,
                                                                                  mask=kernels))
  plain_tx = optax.chain(ss.mixture_prior(3, 0.1, mask=first_kernel_only), optax.sgd(0.1),
                         ss.weight_sharing_prox(0.5, 0.1, axis=0, mask=kernels))
  plain, _ = run(plain_tx)
  injected, _ = run(make(0.1))
  assert_same_updates(injected, plain, rtol=1e-5, atol=1e-6)
