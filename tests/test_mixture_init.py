"""``init_mixture`` on pytrees of many leaves: exact statistics and memory that does not grow with them.

The statistics are read leaf by leaf and chunk by chunk (no concatenation of
the leaves): these tests cross the chunk boundaries (2^20 weights), a leaf's
last chunk overlapping the one before, leaves of other dtypes, small leaves
concatenated beside big ones read in place, and non-finite weights in all of
them. References are independent of the package: ``np.quantile``,
``np.median`` and ``np.min``/``np.max``/``np.std`` in float64 on the
concatenation of the leaves; the memory bound from ``memory_analysis()`` of
the compiled init.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softshare_jax as ss

CHUNK = 1 << 20  # the statistics' chunk (mixture/init.py): the sizes below sit around its multiples


def _leaf(rng, shape, dtype=np.float32, broken=True):
  w = rng.normal(0.0, 0.05, shape).astype(np.float32)
  flat = w.reshape(-1)
  if broken and flat.size > 20:
    flat[:: 997] = np.nan
    flat[5:: 1499] = np.inf
    flat[7:: 2003] = -3e12  # above MAX_WEIGHT: not usable
  return jnp.asarray(w, dtype)


def _tree():
  """Big leaves (a chunk exactly, one weight more, 1.5 chunks, bfloat16), small ones (and an empty one)."""
  rng = np.random.default_rng(13)
  return {
      "exact": _leaf(rng, (1024, 1024)),
      "one_more": _leaf(rng, (CHUNK + 1,)),
      "half_more": _leaf(rng, (3 * 512, 1024)),
      "bf16": _leaf(rng, (CHUNK + 3000,), jnp.bfloat16),
      "bias": [_leaf(rng, (300,)), _leaf(rng, (7, 11), broken=False)],
      "small_bf16": _leaf(rng, (5000,), jnp.bfloat16),
      "empty": jnp.zeros((0, 4), jnp.float32),
      "medium": _leaf(rng, (CHUNK - 1,)),
  }


def _usable_concatenation(tree) -> np.ndarray:
  x = np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(tree)])
  return x[np.isfinite(x) & (np.abs(x) <= 1e12)]


@pytest.fixture(scope="module")
def tree():
  return _tree()


@pytest.fixture(scope="module")
def reference(tree):
  return np.sort(_usable_concatenation(tree))


def _within_2_ulps(got, want, x_sorted, q):
  pos = q * (x_sorted.size - 1)
  scale = np.maximum(np.abs(x_sorted[np.floor(pos).astype(int)]), np.abs(x_sorted[np.ceil(pos).astype(int)]))
  assert np.all(np.abs(np.asarray(got, np.float64) - want) <= 2.4e-7 * scale), (got, want)


def test_quantile_init_of_many_leaves_matches_numpy_on_their_concatenation(tree, reference):
  f = 40  # many ranks: a weight counted twice (or missed) at a chunk boundary would move some of them
  m = ss.init_mixture(tree, f, init="quantile")
  q = (np.arange(f) + 0.5) / f
  _within_2_ulps(m.free_means, np.quantile(reference, q), reference, q)
  np.testing.assert_allclose(float(m.stddevs[0]), 1.4826 * np.median(np.abs(reference)), rtol=1e-6)


def test_range_init_of_many_leaves_matches_numpy(tree, reference):
  m = ss.init_mixture(tree, 1, init="range", zero_component=False)  # F = 1: the stddev is the weights'
  np.testing.assert_allclose(m.free_means, [(reference[0] + reference[-1]) / 2], rtol=1e-6)
  np.testing.assert_allclose(float(m.stddevs[0]), np.std(reference), rtol=1e-5)
  m = ss.init_mixture(tree, 5, init="range")
  np.testing.assert_allclose(m.free_means, np.linspace(reference[0], reference[-1], 5), rtol=1e-6, atol=1e-9)


def test_many_leaves_jit_equals_eager_and_kmeans_sample_as_in_one_array(tree):
  flat = jnp.concatenate([jnp.ravel(v).astype(jnp.float32) for v in jax.tree.leaves(tree)])
  quantile = functools.partial(ss.init_mixture, num_components=40, init="quantile")  # compiled above
  # k-means++ draws its sample by position in the leaves end to end: the same as in the one array.
  kmeans = functools.partial(ss.init_mixture, num_components=6, init="kmeans++", key=jax.random.key(3))
  for got, want in [(jax.jit(quantile)(tree), quantile(tree)), (kmeans(flat), kmeans(tree))]:
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)


def test_init_temporaries_do_not_grow_with_the_leaves():
  # Under jit the init's temporaries are the chunks' (a few 2^20-sized arrays), whatever the weights:
  # eight more leaves of 2^21 float32 (64 MiB) must not add a copy of them (a concatenation did).
  def temp(leaves):
    tree = [jax.ShapeDtypeStruct((2048, 1024), jnp.float32)] * leaves + [jax.ShapeDtypeStruct((100,), jnp.float32)]
    init = jax.jit(functools.partial(ss.init_mixture, num_components=16, init="quantile"))
    return init.lower(tree).compile().memory_analysis().temp_size_in_bytes

  extra_params = 8 * 2048 * 1024 * 4
  assert temp(16) - temp(8) < 0.05 * extra_params


def test_many_leaves_without_usable_weight_or_weights():
  with pytest.raises(ValueError, match="weights has no usable value"):
    ss.init_mixture({"a": jnp.full((3,), jnp.nan), "b": jnp.array([jnp.inf, 2e12])}, 2)
  with pytest.raises(ValueError, match="weights must contain at least one weight"):
    ss.init_mixture({"a": jnp.zeros((0,)), "b": jnp.zeros((2, 0))}, 2)
  with pytest.raises(ValueError, match="weights must be an array or a non-empty pytree"):
    ss.init_mixture({}, 2)
  # Under jit the check cannot run: a NaN mixture instead.
  m = jax.jit(functools.partial(ss.init_mixture, num_components=2))({"a": jnp.full((3,), jnp.nan)})
  assert bool(jnp.all(jnp.isnan(m.free_means)))
