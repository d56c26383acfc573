"""quantize's guards: broken mixtures are rejected, memory is bounded in weights × components."""

import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest

import softshare_jax as ss


def good_mixture():
  return ss.Mixture(free_means=jnp.array([-0.5, 0.5]), log_precisions=jnp.full(3, 4.0),
                    logits=jnp.zeros(2), zero_logit=jnp.array(0.0), has_zero=True)


PARAMS = {"w": jnp.array([[-0.4, 0.05], [0.6, -0.02]])}


@pytest.mark.parametrize(
    "field, value",
    [
        ("free_means", jnp.array([jnp.nan, 0.5])),  # was: codebook [nan]
        ("log_precisions", jnp.array([4.0, jnp.nan, 4.0])),  # was: every weight sent to 0
        ("log_precisions", jnp.array([4.0, 4.0, jnp.inf])),
        ("log_precisions", jnp.array([4.0, 200.0, 4.0])),  # λ = e^200 overflows float32
        ("logits", jnp.array([-jnp.inf, 0.0])),
        ("zero_logit", jnp.array(jnp.nan)),
    ],
)
def test_quantize_rejects_a_broken_mixture(field, value):
  m = good_mixture()
  bad = ss.Mixture(**{**dict(free_means=m.free_means, log_precisions=m.log_precisions, logits=m.logits,
                             zero_logit=m.zero_logit, has_zero=True), field: value})
  with pytest.raises(ValueError, match=f"mixture .*{field}"):
    ss.quantize(PARAMS, bad)


def test_an_unused_zero_logit_is_not_checked():
  # Without a zero component the zero logit is a placeholder leaf.
  m = ss.Mixture(jnp.array([-0.5, 0.5]), jnp.full(2, 4.0), jnp.zeros(2), jnp.array(jnp.nan), has_zero=False)
  q = ss.quantize(PARAMS, m)
  np.testing.assert_array_equal(np.asarray(ss.dequantize(q)["w"]), [[-0.5, 0.5], [0.5, -0.5]])  # nearest mean


def spread_mixture(k, sigma):
  means = np.linspace(-3.0, 3.0, k)
  return ss.Mixture(jnp.asarray(means, jnp.float32), jnp.full(k + 1, -2 * np.log(sigma), jnp.float32),
                    jnp.asarray(np.random.default_rng(0).normal(0, 0.3, k), jnp.float32),
                    jnp.array(-1.0), has_zero=True)


def weights_near(m, n, seed):
  """n weights near 60 of the means (so that a leaf's codebook stays within 256 entries)."""
  rng = np.random.default_rng(seed)
  mu = np.asarray(m.means, np.float64)
  return mu[rng.choice(len(mu), 60)][rng.integers(0, 60, n)] + rng.normal(0, 3e-4, n)


@pytest.mark.parametrize("assignment", ["map", "ml"])
def test_blocked_assignment_is_the_brute_force_argmax(assignment):
  # K = 3000: 1398 weights per block, so 1500 weights take two blocks.
  m = spread_mixture(2999, 1e-3)
  w = weights_near(m, 1500, 1).astype(np.float32)
  q = ss.quantize({"w": jnp.asarray(w.reshape(30, 50))}, m, assignment=assignment)
  mu = np.asarray(m.means, np.float64)
  gamma = np.asarray(m.log_precisions, np.float64)
  log_pi = np.log(np.asarray(m.weights, np.float64)) if assignment == "map" else 0.0
  x = w.astype(np.float64)[:, None]
  want = mu[np.argmax(log_pi + 0.5 * gamma - 0.5 * np.exp(gamma) * (x - mu) ** 2, axis=1)]
  np.testing.assert_array_equal(np.asarray(ss.dequantize(q)["w"]).ravel(), want.astype(np.float32))


def test_quantize_memory_is_bounded_in_weights_times_components():
  # 8192 weights × 2049 components: one (n, K) float64 array would be 134 MB;
  # blocks of 2**22 elements are 32 MiB.
  m = spread_mixture(2048, 1e-3)
  params = {"w": jnp.asarray(weights_near(m, 8192, 2).reshape(64, 128), jnp.float32)}
  tracemalloc.start()
  try:
    q = ss.quantize(params, m)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert q.tree["w"].codebook.size <= 60
  assert peak < 48 * 2**20, peak
