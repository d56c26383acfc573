"""Mixture of Gaussians: densities, responsibilities, initializers, EM, merging.

References are independent of the package: mixtures of ``scipy.stats.norm.pdf``
in float64, the docs/design.md §4.1 gradient and the closed-form M-step written out in
NumPy float64, and ``np.quantile`` / ``np.linspace`` for the initializers.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import softshare_jax as ss


# ----------------------------------------------------------------------------
# References.


def ref_components(m):
  """All-component (μ, λ, π) in float64, from the raw leaves, zero component first."""
  free_mu = np.asarray(m.free_means, np.float64)
  lam = np.exp(np.asarray(m.log_precisions, np.float64))
  eta = np.asarray(m.logits, np.float64)
  soft = np.exp(eta - eta.max()) / np.exp(eta - eta.max()).sum()
  if m.has_zero:
    pi0 = 1.0 / (1.0 + np.exp(-float(m.zero_logit)))
    return np.concatenate([[0.0], free_mu]), lam, np.concatenate([[pi0], (1 - pi0) * soft])
  return free_mu, lam, soft


def ref_joint(m, w):
  """π_j N(w_i | μ_j, 1/λ_j), float64, shape (n, K)."""
  mu, lam, pi = ref_components(m)
  w = np.asarray(w, np.float64).ravel()
  return pi * stats.norm.pdf(w[:, None], loc=mu, scale=1.0 / np.sqrt(lam))


def ref_log_prob(m, w):
  return np.log(ref_joint(m, w).sum(axis=1))


def ref_responsibilities(m, w):
  joint = ref_joint(m, w)
  return joint / joint.sum(axis=1, keepdims=True)


def random_mixture(rng, num_free, has_zero, gamma_range=(-1.0, 2.0)):
  return ss.Mixture(
      free_means=jnp.asarray(rng.normal(0, 1.5, num_free), jnp.float32),
      log_precisions=jnp.asarray(rng.uniform(*gamma_range, num_free + has_zero), jnp.float32),
      logits=jnp.asarray(rng.normal(0, 1, num_free), jnp.float32),
      zero_logit=jnp.asarray(rng.normal(1.0, 1.0), jnp.float32),
      has_zero=has_zero,
  )


def sample(rng, m, n):
  """n weights drawn from the mixture (float64 host)."""
  mu, lam, pi = ref_components(m)
  comp = rng.choice(len(pi), size=n, p=pi / pi.sum())
  return mu[comp] + rng.normal(size=n) / np.sqrt(lam[comp])


def ref_em(m, w, prior=None, zero_prior=None, damping=0.0, learn_zero=False):
  """The closed-form M-step written out in float64; returns all-component (μ, λ, π)."""
  mu0, lam0, pi0 = ref_components(m)
  w = np.asarray(w, np.float64)
  r = ref_responsibilities(m, w)
  n = r.sum(axis=0)
  mu = r.T @ w / n
  if m.has_zero:
    mu[0] = 0.0
  s2 = (r * (w[:, None] - mu) ** 2).sum(axis=0)
  k = len(n)
  alpha = np.full(k, 1.0)
  beta = np.zeros(k)
  if prior is not None:
    alpha[:], beta[:] = prior
  if m.has_zero:
    alpha[0], beta[0] = zero_prior if zero_prior is not None else (1.0, 0.0)
  lam = (n / 2 + alpha - 1) / (s2 / 2 + beta)
  if m.has_zero and not learn_zero:
    pi = np.concatenate([[pi0[0]], (1 - pi0[0]) * n[1:] / n[1:].sum()])
  else:
    pi = n / n.sum()
  d = damping
  return d * mu0 + (1 - d) * mu, np.exp(d * np.log(lam0) + (1 - d) * np.log(lam)), d * pi0 + (1 - d) * pi


def moments(m):
  mu, lam, pi = ref_components(m)
  return pi.sum(), (pi * mu).sum(), (pi * (1 / lam + mu**2)).sum()


# ----------------------------------------------------------------------------
# The Mixture pytree.


def test_mixture_is_a_pytree_with_static_has_zero():
  m = random_mixture(np.random.default_rng(0), 3, True)
  leaves, treedef = jax.tree.flatten(m)
  assert len(leaves) == 4
  back = jax.tree.unflatten(treedef, leaves)
  assert back.has_zero is True and back.num_components == 4
  doubled = jax.jit(lambda m: jax.tree.map(lambda x: 2 * x, m))(m)
  np.testing.assert_allclose(doubled.free_means, 2 * m.free_means)
  assert doubled.has_zero is True


@pytest.mark.parametrize("has_zero", [True, False])
def test_properties_cover_all_components(has_zero):
  m = random_mixture(np.random.default_rng(1), 5, has_zero)
  mu, lam, pi = ref_components(m)
  assert m.num_components == 5 + has_zero
  np.testing.assert_allclose(m.means, mu, rtol=1e-6)
  np.testing.assert_allclose(m.precisions, lam, rtol=1e-5)
  np.testing.assert_allclose(m.stddevs, 1 / np.sqrt(lam), rtol=1e-5)
  np.testing.assert_allclose(m.weights, pi, rtol=1e-5)
  np.testing.assert_allclose(float(jnp.sum(m.weights)), 1.0, rtol=1e-6)
  if has_zero:
    assert float(m.means[0]) == 0.0


def test_only_the_zero_component_has_weight_one():
  m = ss.Mixture(jnp.zeros(0), jnp.zeros(1), jnp.zeros(0), jnp.array(-3.0), has_zero=True)
  np.testing.assert_array_equal(m.weights, [1.0])


# ----------------------------------------------------------------------------
# Densities.


@pytest.mark.parametrize("has_zero", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_prob_matches_scipy(has_zero, seed):
  rng = np.random.default_rng(seed)
  m = random_mixture(rng, 6, has_zero)
  w = rng.normal(0, 2, (7, 9))
  got = ss.mixture_log_prob(m, jnp.asarray(w, jnp.float32))
  assert got.shape == w.shape and got.dtype == jnp.float32
  w32 = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
  np.testing.assert_allclose(got, ref_log_prob(m, w32).reshape(w.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("has_zero", [True, False])
def test_responsibilities_match_scipy_and_sum_to_one(has_zero):
  rng = np.random.default_rng(3)
  m = random_mixture(rng, 4, has_zero)
  w = jnp.asarray(rng.normal(0, 2, (5, 6)), jnp.float32)
  r = ss.responsibilities(m, w)
  assert r.shape == (5, 6, 5 if has_zero else 4) and r.dtype == jnp.float32
  np.testing.assert_allclose(jnp.sum(r, axis=-1), 1.0, rtol=1e-6)
  ref = ref_responsibilities(m, np.asarray(w, np.float64)).reshape(r.shape)
  np.testing.assert_allclose(r, ref, rtol=1e-4, atol=1e-6)


def test_extreme_inputs_stay_finite():
  rng = np.random.default_rng(4)
  k = 64
  gamma = np.full(k + 1, np.log(1e8), np.float32)
  gamma[::2] = -2.0
  logits = rng.normal(size=k).astype(np.float32)
  logits[5] = -1e4  # proportion → 0
  m = ss.Mixture(jnp.asarray(np.linspace(-1e3, 1e3, k), jnp.float32), jnp.asarray(gamma),
                 jnp.asarray(logits), jnp.array(30.0), has_zero=True)
  w = jnp.asarray(np.concatenate([[-1e3, 1e3, 0.0, 1e-9], rng.normal(0, 500, 60)]), jnp.bfloat16)
  lp = ss.mixture_log_prob(m, w)
  r = ss.responsibilities(m, w)
  g = jax.grad(lambda x: -jnp.sum(ss.mixture_log_prob(m, x.astype(jnp.float32))))(w.astype(jnp.float32))
  assert lp.dtype == jnp.float32 and r.dtype == jnp.float32
  for x in (lp, r, g, m.weights):
    assert bool(jnp.all(jnp.isfinite(x)))
  np.testing.assert_allclose(jnp.sum(r, axis=-1), 1.0, rtol=1e-5)


def test_bf16_is_computed_in_float32():
  m = random_mixture(np.random.default_rng(5), 3, True)
  w = jnp.asarray([0.1, -0.7, 1.3], jnp.bfloat16)
  got = ss.mixture_log_prob(m, w)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_log_prob(m, np.asarray(w.astype(jnp.float32), np.float64)), rtol=1e-5)


@pytest.mark.parametrize("has_zero", [True, False])
def test_gradient_is_the_design_formula(has_zero):
  rng = np.random.default_rng(6)
  m = random_mixture(rng, 5, has_zero)
  w = jnp.asarray(rng.normal(0, 2, 40), jnp.float32)
  got = jax.grad(lambda x: -jnp.sum(ss.mixture_log_prob(m, x)))(w)
  w64 = np.asarray(w, np.float64)
  mu, lam, _ = ref_components(m)
  r = ref_responsibilities(m, w64)
  want = (r * lam * (w64[:, None] - mu)).sum(axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_log_prob_jits():
  m = random_mixture(np.random.default_rng(7), 3, True)
  w = jnp.linspace(-2, 2, 11)
  np.testing.assert_allclose(jax.jit(ss.mixture_log_prob)(m, w), ss.mixture_log_prob(m, w), rtol=1e-6)


# ----------------------------------------------------------------------------
# Initializers.


@pytest.fixture(scope="module")
def weights():
  rng = np.random.default_rng(8)
  return jnp.asarray(np.concatenate([rng.normal(0, 0.05, 400), rng.normal(0.5, 0.1, 50), rng.normal(-0.7, 0.1, 50)]),
                     jnp.float32)


@pytest.mark.parametrize("zero_component", [True, False])
def test_range_init_spans_min_max_evenly(weights, zero_component):
  m = ss.init_mixture(weights, 8, zero_component=zero_component, zero_weight=0.9)
  assert m.num_components == 8 + zero_component and m.has_zero == zero_component
  w = np.asarray(weights, np.float64)
  np.testing.assert_allclose(m.free_means, np.linspace(w.min(), w.max(), 8), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.diff(m.free_means), (w.max() - w.min()) / 7, rtol=1e-4)
  free = slice(1, None) if zero_component else slice(None)
  np.testing.assert_allclose(m.weights[free], m.weights[free][0], rtol=1e-6)  # equal proportions
  np.testing.assert_allclose(m.stddevs[free], (w.max() - w.min()) / 7 / 2, rtol=1e-4)
  np.testing.assert_allclose(float(jnp.sum(m.weights)), 1.0, rtol=1e-6)


def test_zero_component_init(weights):
  m = ss.init_mixture(weights, 4, zero_weight=0.95)
  assert float(m.means[0]) == 0.0
  np.testing.assert_allclose(float(m.weights[0]), 0.95, rtol=1e-6)
  np.testing.assert_allclose(m.weights[1:], 0.05 / 4, rtol=1e-5)
  np.testing.assert_allclose(float(m.stddevs[0]), 1.4826 * np.median(np.abs(np.asarray(weights))), rtol=1e-5)


def test_quantile_init(weights):
  m = ss.init_mixture(weights, 5, init="quantile", zero_component=False)
  want = np.quantile(np.asarray(weights, np.float64), (np.arange(5) + 0.5) / 5)
  np.testing.assert_allclose(m.free_means, want, rtol=1e-5, atol=1e-6)


def test_init_accepts_a_pytree(weights):
  tree = {"a": weights[:100].reshape(10, 10), "b": [weights[100:]]}
  for init in ("range", "quantile"):
    a = ss.init_mixture(tree, 4, init=init)
    b = ss.init_mixture(weights, 4, init=init)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-6)


def test_kmeanspp_deterministic_and_recovers_planted_clusters():
  rng = np.random.default_rng(9)
  centres = np.array([-2.0, 0.5, 3.0])
  w = jnp.asarray(np.concatenate([rng.normal(c, 0.05, 200) for c in centres]), jnp.float32)
  key = jax.random.key(0)
  a = ss.init_mixture(w, 3, init="kmeans++", key=key, zero_component=False)
  b = ss.init_mixture(w, 3, init="kmeans++", key=key, zero_component=False)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_allclose(a.free_means, centres, atol=0.02)
  c = ss.init_mixture(w, 3, init="kmeans++", key=jax.random.key(1))  # another seed, zero component
  np.testing.assert_allclose(c.free_means, centres, atol=0.02)
  assert float(c.means[0]) == 0.0


def test_init_jits(weights):
  f = jax.jit(functools.partial(ss.init_mixture, num_components=4, init="kmeans++"))
  m = f(weights, key=jax.random.key(2))
  assert m.num_components == 5 and bool(jnp.all(jnp.isfinite(m.means)))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_components=0), "num_components"),
        (dict(num_components=2.5), "num_components"),
        (dict(num_components=2, zero_weight=0.0), "zero_weight"),
        (dict(num_components=2, zero_weight=1.0), "zero_weight"),
        (dict(num_components=2, init="uniform"), "init"),
        (dict(num_components=2, init="kmeans++"), "key"),
    ],
)
def test_init_bad_args(weights, kwargs, name):
  with pytest.raises(ValueError, match=name):
    ss.init_mixture(weights, **kwargs)


def test_init_rejects_empty():
  with pytest.raises(ValueError, match="weights"):
    ss.init_mixture(jnp.zeros((0,)), 2)


# ----------------------------------------------------------------------------
# EM.


@pytest.mark.parametrize("has_zero", [True, False])
@pytest.mark.parametrize(
    "prior, zero_prior, damping, learn_zero",
    [
        (None, None, 0.0, False),
        ((2.0, 0.5), (3.0, 0.1), 0.0, False),
        ((2.0, 0.5), None, 0.3, False),
        (None, (1.5, 0.2), 0.5, True),
    ],
)
def test_em_step_matches_closed_form(has_zero, prior, zero_prior, damping, learn_zero):
  rng = np.random.default_rng(10)
  m = random_mixture(rng, 4, has_zero, gamma_range=(0.0, 2.0))
  w = sample(rng, m, 600).astype(np.float32)
  got = ss.em_step(m, jnp.asarray(w), precision_prior=prior, zero_precision_prior=zero_prior,
                   damping=damping, learn_zero_weight=learn_zero)
  assert got.has_zero == has_zero and got.num_components == m.num_components
  mu, lam, pi = ref_em(m, w, prior, zero_prior, damping, learn_zero)
  np.testing.assert_allclose(got.means, mu, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got.precisions, lam, rtol=1e-4)
  np.testing.assert_allclose(got.weights, pi, rtol=1e-4, atol=1e-7)
  if has_zero:
    assert float(got.means[0]) == 0.0
    if not learn_zero:
      np.testing.assert_allclose(float(got.weights[0]), float(m.weights[0]), rtol=1e-6)


def test_em_step_accepts_a_pytree_and_jits():
  rng = np.random.default_rng(11)
  m = random_mixture(rng, 3, True)
  w = jnp.asarray(sample(rng, m, 100), jnp.float32)
  a = ss.em_step(m, {"x": w[:30], "y": w[30:].reshape(7, 10)})
  b = jax.jit(ss.em_step)(m, w)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_em_step_dead_component_keeps_its_parameters():
  m = ss.Mixture(jnp.array([-0.5, 0.5, 50.0]), jnp.array([2.0, 2.0, 2.0, 8.0]), jnp.zeros(3),
                 jnp.array(1.0), has_zero=True)
  w = jnp.asarray(np.random.default_rng(12).normal(0, 0.5, 200), jnp.float32)
  got = ss.em_step(m, w)
  for x in jax.tree.leaves(got):
    assert bool(jnp.all(jnp.isfinite(x)))
  assert float(got.free_means[2]) == 50.0
  assert float(got.log_precisions[3]) == 8.0
  np.testing.assert_allclose(float(got.weights[3]), float(m.weights[3]), rtol=1e-5)
  np.testing.assert_allclose(float(jnp.sum(got.weights)), 1.0, rtol=1e-6)


def test_em_step_zero_variance_has_no_nan():
  m = ss.Mixture(jnp.array([0.5]), jnp.zeros(2), jnp.zeros(1), jnp.array(0.0), has_zero=True)
  got = ss.em_step(m, jnp.full((10,), 0.5))  # the free component fits one value exactly
  for x in jax.tree.leaves(got):
    assert bool(jnp.all(jnp.isfinite(x)))
  assert bool(jnp.all(jnp.isfinite(ss.mixture_log_prob(got, jnp.array([0.5, 0.0, 3.0])))))


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(damping=1.0), "damping"), (dict(damping=-0.1), "damping"),
     (dict(precision_prior=(0.0, 1.0)), "precision_prior"),
     (dict(zero_precision_prior=3.0), "zero_precision_prior")],
)
def test_em_step_bad_args(kwargs, name):
  m = random_mixture(np.random.default_rng(13), 2, True)
  with pytest.raises(ValueError, match=name):
    ss.em_step(m, jnp.zeros(4), **kwargs)


# ----------------------------------------------------------------------------
# Merging.


def make(means, stddevs, weights, has_zero):
  """A Mixture from all-component values (zero component first)."""
  means = np.asarray(means, np.float64)
  weights = np.asarray(weights, np.float64)
  free = weights[1:] if has_zero else weights
  return ss.Mixture(
      free_means=jnp.asarray(means[1:] if has_zero else means, jnp.float32),
      log_precisions=jnp.asarray(-2 * np.log(stddevs), jnp.float32),
      logits=jnp.asarray(np.log(free), jnp.float32),
      zero_logit=jnp.asarray(np.log(weights[0] / free.sum()) if has_zero else 0.0, jnp.float32),
      has_zero=has_zero,
  )


def test_merge_identical_components():
  m = make([1.0, 1.0, 5.0], [0.2, 0.2, 0.3], [0.3, 0.2, 0.5], has_zero=False)
  got = ss.merge_components(m, 1e-3)
  assert got.num_components == 2 and not got.has_zero
  np.testing.assert_allclose(got.means, [1.0, 5.0], rtol=1e-6)
  np.testing.assert_allclose(got.stddevs, [0.2, 0.3], rtol=1e-5)
  np.testing.assert_allclose(got.weights, [0.5, 0.5], rtol=1e-5)


def test_merge_moment_matching_by_hand():
  m = make([1.0, 1.2, 9.0], [0.3, 0.4, 0.1], [0.25, 0.25, 0.5], has_zero=False)
  got = ss.merge_components(m, 1.0)  # D(1, 2) ≈ 0.55 < 1
  mu = (0.25 * 1.0 + 0.25 * 1.2) / 0.5
  var = (0.25 * (0.09 + 1.0) + 0.25 * (0.16 + 1.44)) / 0.5 - mu**2
  np.testing.assert_allclose(got.means, [mu, 9.0], rtol=1e-6)
  np.testing.assert_allclose(got.stddevs ** 2, [var, 0.01], rtol=1e-5)
  np.testing.assert_allclose(got.weights, [0.5, 0.5], rtol=1e-5)


def test_merge_into_zero_component():
  m = make([0.0, 0.01, 2.0], [0.1, 0.1, 0.1], [0.8, 0.1, 0.1], has_zero=True)
  got = ss.merge_components(m, 0.1)
  assert got.has_zero and got.num_components == 2
  assert float(got.means[0]) == 0.0
  np.testing.assert_allclose(got.weights, [0.9, 0.1], rtol=1e-5)
  np.testing.assert_allclose(float(got.stddevs[0]) ** 2, (0.8 * 0.01 + 0.1 * (0.01 + 1e-4)) / 0.9, rtol=1e-5)
  _, _, second = moments(m)
  np.testing.assert_allclose(moments(got)[2], second, rtol=1e-5)


def test_merge_everything_into_zero_component():
  m = make([0.0, 0.01, -0.01], [0.1, 0.1, 0.1], [0.5, 0.25, 0.25], has_zero=True)
  got = ss.merge_components(m, 1.0)
  assert got.num_components == 1 and got.has_zero
  np.testing.assert_allclose(got.weights, [1.0])
  assert bool(jnp.all(jnp.isfinite(ss.mixture_log_prob(got, jnp.array([0.0, 1.0])))))


def test_merge_conserves_mass_and_first_moment_and_is_idempotent():
  rng = np.random.default_rng(14)
  means = np.sort(rng.normal(0, 1, 12))
  m = make(means, np.full(12, 0.3), rng.dirichlet(np.ones(12)), has_zero=False)
  got = ss.merge_components(m, 0.5)
  assert 1 <= got.num_components < 12
  for a, b in zip(moments(got), moments(m)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  again = ss.merge_components(got, 0.5)
  assert again.num_components == got.num_components
  for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(got)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_merge_leaves_far_components_alone():
  m = make([0.0, 10.0, 20.0, -30.0], [0.1, 0.5, 0.2, 1.0], [0.7, 0.1, 0.1, 0.1], has_zero=True)
  got = ss.merge_components(m, 1.0)
  assert got.num_components == 4
  np.testing.assert_allclose(got.means, m.means, rtol=1e-6)
  np.testing.assert_allclose(got.stddevs, m.stddevs, rtol=1e-6)
  np.testing.assert_allclose(got.weights, m.weights, rtol=1e-5)


def test_merge_bad_threshold():
  m = make([0.0, 1.0], [0.1, 0.1], [0.5, 0.5], has_zero=True)
  with pytest.raises(ValueError, match="threshold"):
    ss.merge_components(m, -1.0)


@hypothesis.settings(max_examples=15)
@hypothesis.given(
    k=st.integers(1, 8),
    has_zero=st.booleans(),
    threshold=st.floats(0.0, 5.0),
    seed=st.integers(0, 2**16),
)
def test_merge_conservation_property(k, has_zero, threshold, seed):
  rng = np.random.default_rng(seed)
  m = random_mixture(rng, k, has_zero, gamma_range=(-2.0, 4.0))
  got = ss.merge_components(m, threshold)
  assert got.has_zero == has_zero and 1 <= got.num_components <= m.num_components
  mass, first, second = moments(m)
  g_mass, g_first, g_second = moments(got)
  np.testing.assert_allclose(float(jnp.sum(got.weights)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(g_mass, mass, rtol=1e-5)
  np.testing.assert_allclose(g_second, second, rtol=1e-4)
  if not has_zero:
    np.testing.assert_allclose(g_first, first, rtol=1e-4, atol=1e-5)
  if has_zero:
    assert float(got.means[0]) == 0.0
  assert ss.merge_components(got, threshold).num_components == got.num_components


# ----------------------------------------------------------------------------
# Broken weights (NaN, Inf, overflowing) and broken mixtures.

BROKEN = [np.nan, np.inf, -np.inf, 1e20]


@pytest.mark.parametrize("bad", BROKEN)
@pytest.mark.parametrize("has_zero", [True, False])
def test_em_step_ignores_broken_weights(bad, has_zero):
  # 1e20 is finite but λ (w − μ)² overflows float32 for every component: it
  # has no finite density either. The step must be that of the healthy weights.
  rng = np.random.default_rng(20)
  m = random_mixture(rng, 3, has_zero, gamma_range=(0.0, 2.0))
  w = sample(rng, m, 300).astype(np.float32)
  got = ss.em_step(m, jnp.asarray(np.concatenate([w[:100], [bad], w[100:], [bad]]), jnp.float32))
  mu, lam, pi = ref_em(m, w)
  np.testing.assert_allclose(got.means, mu, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got.precisions, lam, rtol=1e-4)
  np.testing.assert_allclose(got.weights, pi, rtol=1e-4, atol=1e-7)


def test_em_step_with_no_usable_weight():
  m = random_mixture(np.random.default_rng(21), 2, True)
  for w in (jnp.full((5,), jnp.nan), jnp.array([jnp.inf, -jnp.inf, 1e20])):
    with pytest.raises(ValueError, match="w has no usable weight"):
      ss.em_step(m, w)
    # Under jit it cannot raise: every component has lost its mass, nothing moves.
    got = jax.jit(ss.em_step)(m, w)
    for x, y in zip(ref_components(got), ref_components(m)):  # logits are only defined up to a shift
      np.testing.assert_allclose(x, y, rtol=1e-6)


def test_em_step_nan_mixture_is_not_hidden():
  # A NaN mixture gives NaN, not a silently unchanged mixture.
  m = ss.Mixture(jnp.array([jnp.nan]), jnp.zeros(2), jnp.zeros(1), jnp.array(0.0), True)
  got = ss.em_step(m, jnp.array([0.1, 0.2]))
  assert bool(jnp.isnan(got.free_means[0]))


@pytest.mark.parametrize("init", ["range", "quantile"])
@pytest.mark.parametrize("zero_component", [True, False])
def test_init_ignores_non_finite_weights(weights, init, zero_component):
  broken = jnp.concatenate([weights[:50], jnp.array([jnp.nan, jnp.inf, -jnp.inf]), weights[50:]])
  got = ss.init_mixture(broken, 4, init=init, zero_component=zero_component)
  want = ss.init_mixture(weights, 4, init=init, zero_component=zero_component)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  # Against the NumPy references of the finite weights.
  w = np.asarray(weights, np.float64)
  ref = np.linspace(w.min(), w.max(), 4) if init == "range" else np.quantile(w, (np.arange(4) + 0.5) / 4)
  np.testing.assert_allclose(got.free_means, ref, rtol=1e-5, atol=1e-6)
  if zero_component:
    np.testing.assert_allclose(float(got.stddevs[0]), 1.4826 * np.median(np.abs(w)), rtol=1e-5)


def test_kmeanspp_init_ignores_non_finite_weights():
  rng = np.random.default_rng(22)
  centres = np.array([-2.0, 0.5, 3.0])
  w = np.concatenate([rng.normal(c, 0.05, 200) for c in centres])
  w[::7] = np.nan
  w[3::11] = np.inf
  m = ss.init_mixture(jnp.asarray(w, jnp.float32), 3, init="kmeans++", key=jax.random.key(0),
                      zero_component=False)
  np.testing.assert_allclose(m.free_means, centres, atol=0.02)


def test_init_with_no_finite_weight():
  with pytest.raises(ValueError, match="weights has no usable value"):
    ss.init_mixture(jnp.array([jnp.nan, jnp.inf]), 2)


@pytest.mark.parametrize(
    "field, value",
    [("free_means", jnp.array([jnp.nan, 1.0])), ("log_precisions", jnp.array([0.0, jnp.nan, 0.0])),
     ("logits", jnp.array([0.0, jnp.inf])), ("zero_logit", jnp.array(jnp.nan)),
     ("log_precisions", jnp.array([0.0, 200.0, 0.0]))],  # λ = e^200 overflows float32
)
def test_merge_rejects_a_broken_mixture(field, value):
  m = make([0.0, 1.0, 1.001], [0.1, 0.1, 0.1], [0.5, 0.25, 0.25], has_zero=True)
  bad = ss.Mixture(**{**dict(free_means=m.free_means, log_precisions=m.log_precisions, logits=m.logits,
                             zero_logit=m.zero_logit, has_zero=True), field: value})
  with pytest.raises(ValueError, match=f"mixture .*{field}"):
    ss.merge_components(bad, 1.0)


def _merge_reference(mixture, threshold):
  """The quadratic-per-merge algorithm: every divergence recomputed before each merge (float64)."""
  has_zero = mixture.has_zero
  mu = list(np.asarray(mixture.means, np.float64))
  gamma = list(np.asarray(mixture.log_precisions, np.float32).astype(np.float64))
  pi = np.asarray(mixture.weights, np.float64)
  pi = list(pi / pi.sum())
  while len(mu) > 1:
    var = np.exp(-np.asarray(gamma))
    m_ = np.asarray(mu)
    d2 = np.square(m_[:, None] - m_[None, :])
    kl = (var[:, None] + d2) / (2 * var[None, :]) + (var[None, :] + d2) / (2 * var[:, None]) - 1.0
    kl[np.tril_indices(len(mu))] = np.inf
    a, b = np.unravel_index(np.argmin(kl), kl.shape)
    if not kl[a, b] < threshold:
      break
    p = pi[a] + pi[b]
    second = (pi[a] * (var[a] + mu[a] ** 2) + pi[b] * (var[b] + mu[b] ** 2)) / p
    new_mu = 0.0 if has_zero and a == 0 else float(np.float32((pi[a] * mu[a] + pi[b] * mu[b]) / p))
    new_var = max(second - new_mu**2, 1e-300)
    mu[a], pi[a] = new_mu, p
    gamma[a] = float(np.float32(np.clip(-np.log(new_var), -60.0, 60.0)))
    del mu[b], gamma[b], pi[b]
  return np.asarray(mu), np.asarray(gamma), np.asarray(pi)


@hypothesis.settings(max_examples=20)
@hypothesis.given(
    k=st.integers(1, 24),
    has_zero=st.booleans(),
    threshold=st.sampled_from([0.0, 0.05, 0.5, 3.0, 1e9]),
    copies=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_merge_makes_the_same_merges_as_recomputing_everything(k, has_zero, threshold, copies, seed):
  # Repeated components make exact ties: the order of merges must be the same too.
  rng = np.random.default_rng(seed)
  base = random_mixture(rng, k, has_zero, gamma_range=(-2.0, 4.0))
  m = ss.Mixture(jnp.tile(base.free_means, copies),
                 jnp.concatenate([base.log_precisions[:int(has_zero)]]
                                 + [base.log_precisions[int(has_zero):]] * copies),
                 jnp.tile(base.logits, copies), base.zero_logit, has_zero)
  got = ss.merge_components(m, threshold)
  mu, gamma, pi = _merge_reference(m, threshold)
  np.testing.assert_array_equal(np.asarray(got.means, np.float64), mu.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(got.log_precisions), gamma.astype(np.float32))
  np.testing.assert_allclose(np.asarray(got.weights, np.float64), pi / pi.sum(), rtol=1e-6)


def test_merge_memory_is_not_quadratic():
  import tracemalloc
  # K = 3000: a K × K float64 matrix is 72 MB; the merge keeps a nearest
  # partner per component and evaluates 2**20 divergences at a time.
  k = 3000
  means = np.linspace(-30.0, 30.0, k)  # D ≈ 400 between neighbours
  means[10] = means[9] + 1e-7  # one close pair: one merge, then none is close
  m = make(means, np.full(k, 1e-3), np.full(k, 1.0 / k), has_zero=False)
  tracemalloc.start()
  try:
    got = ss.merge_components(m, 1e-3)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert got.num_components == k - 1
  assert peak < 48 * 2**20, peak
