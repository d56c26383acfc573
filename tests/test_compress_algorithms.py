"""The compression algorithms at scale: 1-D Lloyd on sorted data, sort-free quantiles, merging.

References are independent of the package: the former ``np.bincount``
Lloyd's iterations (kept here), brute-force nearest centres, ``np.sort`` and
``np.quantile`` in float64, and a brute-force merge that recomputes every
pairwise divergence before each merge.
"""

import fractions
import functools
import math
import tracemalloc

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softshare_jax as ss
from softshare_jax.compress.lloyd import cluster_bounds
from softshare_jax.compress.lloyd import lloyd_1d
from softshare_jax.compress.lloyd import nearest_centres
from softshare_jax.mixture.init import KMEANS_SAMPLE
from softshare_jax.mixture.init import order_statistics
from softshare_jax.mixture.init import quantile_ranks
from softshare_jax.mixture.init import quantiles
from softshare_jax.mixture.model import MAX_LOG_PRECISION
from softshare_jax.mixture.model import usable

from benchmarks.compress_algorithms import reference_lloyd

# ----------------------------------------------------------------------------
# Lloyd's iterations in 1-D.


# The former implementation (every weight assigned by searchsorted, sums by bincount), kept in the benchmark.
ref_lloyd = reference_lloyd


def _data(kind, n, rng):
  if kind == "normal":
    return rng.normal(0, 0.05, n).astype(np.float32)
  if kind == "duplicates":  # few distinct values, many ties
    return (rng.integers(-6, 7, n) * 0.125).astype(np.float32)
  if kind == "heavy":
    return (rng.standard_t(1.5, n) * 1e-2).astype(np.float32)
  if kind == "float64":
    return np.concatenate([rng.normal(0, 1, n), [50.0, -50.0]])
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["normal", "duplicates", "heavy", "float64"])
@pytest.mark.parametrize("seed", range(6))
def test_lloyd_matches_the_bincount_iterations(kind, seed):
  rng = np.random.default_rng(seed)
  x = np.sort(_data(kind, int(rng.integers(2, 20000)), rng))
  k = int(rng.integers(1, 40))
  start = rng.choice(x, k) if seed % 2 else np.linspace(x[0], x[-1], k)
  got, want = lloyd_1d(x, start), ref_lloyd(x, start)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * float(x[-1] - x[0] or 1.0))


def test_lloyd_ties_at_midpoints_go_to_the_lower_centre():
  # Centres 0, 2, 4 put midpoints at 1 and 3, where weights sit: to the lower centre, as searchsorted.
  x = np.sort(np.array([0.0, 1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 4.0, 10.0]))
  start = np.array([0.0, 2.0, 4.0])
  np.testing.assert_allclose(lloyd_1d(x, start), ref_lloyd(x, start), rtol=0, atol=1e-13)
  np.testing.assert_array_equal(cluster_bounds(x, start), [3, 7, 9])


def test_lloyd_adversarial_ties_over_many_iterations():
  # Integers and half-integer centres: every iteration has weights exactly on midpoints.
  rng = np.random.default_rng(3)
  x = np.sort(rng.integers(0, 40, 5000).astype(np.float64))
  for k in (2, 3, 7, 16):
    start = np.arange(k) * 2.0
    np.testing.assert_allclose(lloyd_1d(x, start), ref_lloyd(x, start), rtol=0, atol=1e-12)


def test_lloyd_small_clusters_far_into_a_large_array():
  # Isolated weights between two big modes: a float64 prefix sum over everything reaches ~1e7 there and
  # loses ~1e-9 on their means. The bincount reference is itself off by ~1e-11 on the big clusters,
  # so the tight reference is math.fsum over the final clusters.
  rng = np.random.default_rng(5)
  lone = [1020.123456789, 1021.987654321]
  x = np.sort(np.concatenate([rng.normal(1000.0, 1.0, 500_000), lone, rng.normal(1040.0, 1.0, 500_000)]))
  start = np.array([1000.0, 1020.0, 1022.0, 1040.0])
  got = lloyd_1d(x, start)
  ends = cluster_bounds(x, got)
  starts = np.concatenate([[0], ends[:-1]])
  exact = [math.fsum(x[s:e]) / (e - s) if e > s else c for s, e, c in zip(starts, ends, got)]
  np.testing.assert_array_equal(ends - starts, [500_000, 1, 1, 500_000])
  np.testing.assert_allclose(got, exact, rtol=0, atol=1e-13 * (x[-1] - x[0]))
  np.testing.assert_allclose(got, ref_lloyd(x, start), rtol=0, atol=1e-12 * (x[-1] - x[0]))


def test_lloyd_empty_clusters_keep_their_centres():
  x = np.array([0.0, 0.1, 0.2])
  got = lloyd_1d(x, np.array([5.0, 0.1, 9.0]))
  np.testing.assert_allclose(got, ref_lloyd(x, np.array([5.0, 0.1, 9.0])), rtol=0, atol=1e-15)
  np.testing.assert_allclose(got, [0.1, 5.0, 9.0], rtol=0, atol=1e-15)


@hypothesis.given(
    st.lists(st.integers(-20, 20), min_size=1, max_size=60),
    st.lists(st.integers(-40, 40), min_size=1, max_size=8),
)
@hypothesis.settings(deadline=None, max_examples=150)
def test_lloyd_property_matches_reference(values, centres):
  x = np.sort(np.asarray(values, np.float64) / 4)
  start = np.asarray(centres, np.float64) / 8
  np.testing.assert_allclose(lloyd_1d(x, start), ref_lloyd(x, start), rtol=0, atol=1e-12)


def test_nearest_centres_and_bounds_against_brute_force():
  rng = np.random.default_rng(1)
  x = rng.integers(-8, 9, 500) * 0.25
  c = np.array([-1.0, -0.5, 0.0, 1.0, 1.0])
  d = np.abs(x[:, None] - np.sort(c)[None, :])
  want = np.sort(c)[np.argmin(d, axis=1)]  # argmin: ties to the lower centre
  np.testing.assert_array_equal(nearest_centres(x, c), want)
  xs = np.sort(x)
  ends = cluster_bounds(xs, np.sort(c))
  starts = np.concatenate([[0], ends[:-1]])
  labels = np.repeat(np.arange(c.size), ends - starts)
  np.testing.assert_array_equal(np.sort(c)[labels], np.sort(c)[np.argmin(np.abs(xs[:, None] - np.sort(c)), 1)])


def test_lloyd_rejects_2d():
  with pytest.raises(ValueError, match="x_sorted"):
    lloyd_1d(np.zeros((2, 2)), np.zeros(2))


# ----------------------------------------------------------------------------
# Sort-free order statistics and quantiles.


def _weights(kind, n, rng):
  w = rng.normal(0, 0.05, n).astype(np.float32)
  if kind == "ties":
    w = np.round(w * 40) / 40
  elif kind == "broken":
    w[::3] = np.nan
    w[1::7] = np.inf
    w[2::11] = -2e12  # above MAX_WEIGHT: not usable
  elif kind == "signed_zeros":
    w = np.where(rng.random(n) < 0.5, np.float32(-0.0), np.float32(0.0)) + (rng.random(n) < 0.2).astype(np.float32)
  elif kind == "wide":
    w = (rng.standard_cauchy(n) * 1e3).astype(np.float32)
  return w


KINDS = ["normal", "ties", "broken", "signed_zeros", "wide"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 5, 1000, 70001])
def test_order_statistics_are_exact(kind, n):
  rng = np.random.default_rng(n)
  w = _weights(kind, n, rng)
  ok = np.isfinite(w) & (np.abs(w) <= 1e12)
  if not ok.any():
    return
  ranks = np.unique(np.concatenate([[0, ok.sum() - 1], rng.integers(0, ok.sum(), 40)]))
  got = np.asarray(order_statistics(jnp.asarray(w), jnp.asarray(ok), jnp.asarray(ranks)))
  np.testing.assert_array_equal(got, np.sort(w[ok])[ranks])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 3, 10, 1001, 70001])
@pytest.mark.parametrize("f", [1, 4, 40])
def test_quantiles_match_numpy(kind, n, f):
  rng = np.random.default_rng(n + f)
  w = _weights(kind, n, rng)
  ok = np.isfinite(w) & (np.abs(w) <= 1e12)
  if not ok.any():
    return
  got = np.asarray(quantiles(jnp.asarray(w), usable(jnp.asarray(w)), 2 * np.arange(f) + 1, 2 * f))
  x = np.sort(w[ok].astype(np.float64))
  want = np.quantile(x, (np.arange(f) + 0.5) / f)
  pos = (np.arange(f) + 0.5) / f * (x.size - 1)
  scale = np.maximum(np.abs(x[np.floor(pos).astype(int)]), np.abs(x[np.ceil(pos).astype(int)]))
  assert np.all(np.abs(got - want) <= 2.4e-7 * scale), (got, want)  # 2 float32 ulps of the larger neighbour


def test_quantile_ranks_exact_integer_arithmetic():
  for m in (1, 2, 7, 10**6 + 3, 3 * 10**7 + 1):
    for f in (1, 3, 16, 255):
      nums = 2 * np.arange(f) + 1
      lo, hi, t = quantile_ranks(m, nums, 2 * f)
      exact = [fractions.Fraction(int(k) * (m - 1), 2 * f) for k in nums]
      np.testing.assert_array_equal(lo, [math.floor(v) for v in exact])
      np.testing.assert_array_equal(hi, [math.ceil(v) for v in exact])
      np.testing.assert_allclose(t, [float(v - math.floor(v)) for v in exact], rtol=0, atol=1e-15)


def test_quantiles_traced_equal_eager_and_nan_without_valid_weights():
  w = jnp.asarray(_weights("broken", 5000, np.random.default_rng(0)))
  fn = lambda w: quantiles(w, usable(w), np.array([1, 3, 5]), 6)
  np.testing.assert_array_equal(jax.jit(fn)(w), fn(w))
  assert bool(jnp.all(jnp.isnan(jax.jit(fn)(jnp.full((10,), jnp.nan)))))


def test_init_quantile_and_zero_width_match_numpy_under_jit():
  rng = np.random.default_rng(4)
  w = _weights("broken", 100_003, rng)
  ok = np.isfinite(w) & (np.abs(w) <= 1e12)
  init = jax.jit(functools.partial(ss.init_mixture, num_components=7, init="quantile"))
  m = init(jnp.asarray(w))
  x = w[ok].astype(np.float64)
  np.testing.assert_allclose(m.free_means, np.quantile(x, (np.arange(7) + 0.5) / 7), rtol=3e-7, atol=1e-9)
  np.testing.assert_allclose(float(m.stddevs[0]), 1.4826 * np.median(np.abs(x)), rtol=1e-6)
  eager = ss.init_mixture(jnp.asarray(w), 7, init="quantile")
  for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(eager)):
    np.testing.assert_array_equal(a, b)


def test_kmeanspp_init_on_a_sample_recovers_planted_clusters():
  rng = np.random.default_rng(8)
  centres = np.array([-0.3, 0.05, 0.4])
  n = 3 * KMEANS_SAMPLE
  w = np.concatenate([rng.normal(c, 0.01, n // 3) for c in centres]).astype(np.float32)
  w[::5] = np.nan
  m = ss.init_mixture(jnp.asarray(w), 3, init="kmeans++", key=jax.random.key(0), zero_component=False)
  np.testing.assert_allclose(m.free_means, centres, atol=0.01)
  jitted = jax.jit(functools.partial(ss.init_mixture, num_components=3, init="kmeans++", zero_component=False))
  np.testing.assert_array_equal(jitted(jnp.asarray(w), key=jax.random.key(0)).free_means, m.free_means)


def test_kmeanspp_init_sample_without_usable_weight_falls_back_to_all():
  w = np.full(4 * KMEANS_SAMPLE, np.nan, np.float32)
  w[12345] = 0.5
  m = ss.init_mixture(jnp.asarray(w), 1, init="kmeans++", key=jax.random.key(0), zero_component=False)
  np.testing.assert_array_equal(m.free_means, [0.5])


# ----------------------------------------------------------------------------
# Merging.


def ref_merge(mixture, threshold):
  """Brute force: all pairwise divergences recomputed before each merge; first minimum in row-major order."""
  has_zero = mixture.has_zero
  mu = np.asarray(mixture.means, np.float64).copy()
  gamma = np.asarray(mixture.log_precisions, np.float32).astype(np.float64)
  pi = np.asarray(mixture.weights, np.float64)
  pi = pi / pi.sum()
  var = np.exp(-gamma)
  alive = np.ones(mu.size, bool)
  while alive.sum() > 1:
    idx = np.flatnonzero(alive)
    d2 = np.square(mu[idx, None] - mu[None, idx])
    va, vb = var[idx, None], var[None, idx]
    d = (va + d2) / (2 * vb) + (vb + d2) / (2 * va) - 1.0
    d[np.tril_indices(idx.size)] = np.inf
    flat = int(np.argmin(d))
    i, j = divmod(flat, idx.size)
    if not d[i, j] < threshold:
      break
    a, b = idx[i], idx[j]
    p = pi[a] + pi[b]
    second = (pi[a] * (var[a] + mu[a]**2) + pi[b] * (var[b] + mu[b]**2)) / p
    new_mu = 0.0 if has_zero and a == 0 else float(np.float32((pi[a] * mu[a] + pi[b] * mu[b]) / p))
    new_var = max(second - new_mu**2, 1e-300)
    mu[a] = new_mu
    gamma[a] = float(np.float32(np.clip(-np.log(new_var), -MAX_LOG_PRECISION, MAX_LOG_PRECISION)))
    pi[a] = p
    var[a:a + 1] = np.exp(-gamma[a:a + 1])
    alive[b] = False
  return mu[alive], gamma[alive], pi[alive]


def _mixture(k, seed, has_zero, spread=1.0):
  rng = np.random.default_rng(seed)
  means = np.round(rng.normal(0, spread, k) * 64) / 64  # repeated means: ties between divergences
  return ss.Mixture(jnp.asarray(means, jnp.float32),
                    jnp.asarray(rng.choice([2.0, 4.0, 6.0], k + has_zero), jnp.float32),  # and ties
                    jnp.asarray(rng.normal(0, 1, k), jnp.float32), jnp.array(0.5), has_zero=has_zero)


@pytest.mark.parametrize("has_zero", [True, False])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.05, 1.0, 50.0])
def test_merge_matches_brute_force(has_zero, seed, threshold):
  m = _mixture(80, seed, has_zero)
  got = ss.merge_components(m, threshold)
  mu, gamma, pi = ref_merge(m, threshold)
  np.testing.assert_array_equal(got.means, mu.astype(np.float32))
  np.testing.assert_array_equal(got.log_precisions, gamma.astype(np.float32))
  np.testing.assert_allclose(got.weights, pi / pi.sum(), rtol=2e-6)


def test_merge_many_components_in_bounded_memory():
  # K = 3000: one K × K float64 matrix is 72 MB; the merge keeps to a few 8 MiB blocks (~42 MB at peak).
  k = 3000
  m = _mixture(k, 0, True, spread=3.0)
  tracemalloc.start()
  try:
    got = ss.merge_components(m, 0.5)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 60 * 2**20, peak
  assert 1 < got.num_components < k
  np.testing.assert_allclose(float(jnp.sum(got.weights)), 1.0, rtol=1e-5)
