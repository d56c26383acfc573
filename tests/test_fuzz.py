"""Bad inputs for every public function: a clear ValueError or the right answer.

Hypothesis draws shapes (scalars, empty axes, odd sizes), dtypes (float32,
bf16, f16, ints, bools, complex), magnitudes (tiny to 1e30) and non-finite
values, and each public function must either raise a ``ValueError`` (whose
message names what is wrong) or return a result of the right structure:
same shapes and dtypes, and finite wherever the inputs were finite. Any other
exception type fails. Damaged files are fuzzed in ``test_fuzz_files.py``.
"""

from __future__ import annotations

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softshare_jax as ss

# Few shapes, so that jit compiles each a bounded number of times.
SHAPES = [(), (0,), (1,), (5,), (3, 0), (2, 3), (4, 4), (2, 3, 2)]
FLOATS = [np.float32, jnp.bfloat16, np.float16]
OTHERS = [np.int32, np.bool_, np.complex64]
AXES = [None, 0, 1, -1, (0, 1), 2, (0, 0), "0", 1.5]

settings = hypothesis.settings(max_examples=25, deadline=None,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])


@st.composite
def arrays(draw, dtypes=FLOATS, finite=None):
  """An array of a drawn shape and dtype; magnitudes from 1e-30 to 1e30, maybe NaN/Inf."""
  shape = draw(st.sampled_from(SHAPES))
  dtype = draw(st.sampled_from(dtypes))
  scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]))
  x = draw(hnp.arrays(np.float64, shape, elements=st.floats(-1, 1, allow_nan=False, width=32))) * scale
  if finite is None:
    finite = draw(st.booleans())
  if not finite and x.size:
    where = draw(st.integers(0, x.size - 1))
    x.reshape(-1)[where] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
  with np.errstate(over="ignore", invalid="ignore"):
    out = jnp.asarray(x.astype(np.float32)).astype(dtype) if dtype in FLOATS else jnp.asarray(x).astype(dtype)
  if finite and dtype in FLOATS:  # a magnitude past the dtype's range is not a finite input
    out = jnp.where(jnp.isfinite(out), out, 0).astype(dtype)
  return out


def is_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32)))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def finite_input(x) -> bool:
  return bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32))))


def call(fn, *args, **kwargs):
  """``fn(...)``, or None when it raises a ValueError (the allowed failure)."""
  try:
    return fn(*args, **kwargs)
  except ValueError as e:
    assert str(e), "a ValueError must say what is wrong"
    return None


# ----------------------------------------------------------------------------
# The weight-sharing regularizer and its prox.


@settings
@hypothesis.given(x=arrays(FLOATS + OTHERS), axis=st.sampled_from(AXES))
def test_penalty(x, axis):
  r = call(ss.weight_sharing_penalty, x, axis=axis)
  if r is None:
    return
  assert jnp.shape(r) == ()
  if finite_input(x) and float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)), initial=0)) < 1e30:
    assert is_finite(r)


@settings
@hypothesis.given(x=arrays(FLOATS + OTHERS), axis=st.sampled_from(AXES),
                  strength=st.sampled_from([0.0, 1e-3, 1.0, 1e16, 1e38, 1e39, -1.0, np.nan, np.inf]),
                  method=st.sampled_from(["auto", "host", "device"]))
def test_prox(x, axis, strength, method):
  out = call(ss.prox_weight_sharing, x, strength, axis=axis, method=method)
  if out is None:
    return
  assert out.shape == x.shape and out.dtype == x.dtype
  if finite_input(x) and np.isfinite(strength):
    assert is_finite(out)
    if strength == 0.0:
      np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(x, np.float32))


@settings
@hypothesis.given(w=arrays(FLOATS, finite=True), seed=st.integers(0, 2**16),
                  strength=st.sampled_from([0.0, 0.1, 1e20]), axis=st.sampled_from([None, 0, -1]))
def test_prox_transform(w, seed, strength, axis):
  u = jnp.asarray(np.random.default_rng(seed).normal(0.0, 0.1, w.shape), jnp.float32)
  tx = call(ss.weight_sharing_prox, strength, 0.1, axis=axis)
  params, updates = {"w": w, "b": jnp.ones(2)}, {"w": u.astype(w.dtype), "b": jnp.ones(2)}
  out = call(lambda: tx.update(updates, tx.init(params), params)[0])
  if out is None:
    return
  assert out["w"].shape == w.shape and out["w"].dtype == w.dtype
  if float(jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)), initial=0)) < 1e30:
    assert is_finite(out)


# ----------------------------------------------------------------------------
# The mixture.


@st.composite
def mixtures(draw, broken=True):
  k = draw(st.integers(1, 4))
  values = st.floats(-3, 3, allow_nan=False)
  mu = np.asarray(draw(st.lists(values, min_size=k, max_size=k)), np.float32)
  gamma = np.asarray(draw(st.lists(values, min_size=k + 1, max_size=k + 1)), np.float32)
  if broken and draw(st.booleans()):
    (mu if draw(st.booleans()) else gamma)[0] = draw(st.sampled_from([np.nan, np.inf]))
  return ss.Mixture(jnp.asarray(mu), jnp.asarray(gamma), jnp.zeros(k), jnp.asarray(0.0), has_zero=True)


@settings
@hypothesis.given(m=mixtures(broken=False), w=arrays(FLOATS))
def test_densities(m, w):
  lp = call(ss.mixture_log_prob, m, w)
  r = call(ss.responsibilities, m, w)
  if lp is None or r is None:
    return
  assert lp.shape == w.shape and r.shape == w.shape + (m.num_components,)
  finite = np.isfinite(np.asarray(w, np.float32))
  assert not np.any(np.isnan(np.asarray(lp)[finite]))
  if finite.size and float(np.max(np.abs(np.asarray(w, np.float32)[finite]), initial=0)) < 1e15:
    np.testing.assert_allclose(np.asarray(r).sum(-1)[finite], 1.0, rtol=1e-5)


@settings
@hypothesis.given(w=arrays(FLOATS + OTHERS), k=st.sampled_from([1, 3, 0, -1, 2.5]),
                  init=st.sampled_from(["range", "quantile", "kmeans++", "median"]))
def test_init_and_em(w, k, init):
  m = call(ss.init_mixture, w, k, init=init, key=jax.random.key(0))
  if m is None:
    return
  assert m.num_components == k + 1
  assert is_finite(m), "init_mixture must return a finite mixture (or raise)"
  m2 = call(ss.em_step, m, w)
  if m2 is not None:
    assert is_finite(m2), "em_step must keep the mixture finite (or raise)"


@settings
@hypothesis.given(m=mixtures(), threshold=st.sampled_from([0.0, 1e-2, 10.0, -1.0, np.nan]))
def test_merge(m, threshold):
  merged = call(ss.merge_components, m, threshold)
  if merged is not None:
    assert is_finite(merged) and merged.num_components <= m.num_components


@settings
@hypothesis.given(w=arrays([np.float32], finite=None), update=st.sampled_from(["gradient", "em"]))
def test_prior_transform(w, update):
  hypothesis.assume(w.ndim >= 2 and w.size > 0)
  tx = optax.chain(ss.mixture_prior(3, 1e-2, mixture_update=update), optax.sgd(0.1))
  clean = jnp.nan_to_num(w, nan=0.0, posinf=1.0, neginf=-1.0)
  params = {"w": clean}
  state = call(tx.init, params)
  if state is None:  # no usable weight to start a mixture from: a ValueError, fine
    return
  grads = {"w": jnp.zeros_like(w)}
  # One step on weights that may be broken, then one on clean weights.
  out = call(lambda: tx.update(grads, state, {"w": w}))
  if out is None:
    return
  updates, state = out
  assert is_finite(ss.get_mixture(state)), "a broken weight must not break the mixture"
  finite = np.isfinite(np.asarray(w)) & (np.abs(np.asarray(w)) < 1e15)
  assert np.all(np.isfinite(np.asarray(updates["w"])[finite])), "healthy weights got a non-finite update"
  updates, state = tx.update(grads, state, params)
  assert is_finite(updates) and is_finite(ss.get_mixture(state))


# ----------------------------------------------------------------------------
# Compression.


@settings
@hypothesis.given(w=arrays(FLOATS + OTHERS), m=mixtures(), how=st.sampled_from(["quantize", "none", "kmeans", "hash"]))
def test_quantizers(w, m, how):
  params = {"w": w}
  mask = {"w": True}
  make = {
      "quantize": lambda: ss.quantize(params, m, mask=mask),
      "none": lambda: ss.quantize(params, None, mask=mask),
      "kmeans": lambda: ss.cluster_weights(params, 3, mask=mask, key=jax.random.key(0)),
      "hash": lambda: ss.hash_clusters(params, 3, mask=mask, key=jax.random.key(0)),
  }[how]
  q = call(make)
  if q is None:
    return
  back = ss.dequantize(q)["w"]
  assert back.shape == w.shape and back.dtype == w.dtype
  assert is_finite(back)
  report = ss.compression_report(q)
  assert report.total.weights == w.size


@settings
@hypothesis.given(mask=st.sampled_from([None, True, False, {"w": True}, {"w": "False"}, {"w": 1}, {"x": True},
                                        {"w": True, "b": True}, lambda p: {"w": True, "b": False}]))
def test_masks(mask):
  params = {"w": jnp.ones((3, 3)), "b": jnp.arange(3)}
  for build in (lambda: ss.weight_sharing_prox(0.1, 0.1, mask=mask),
                lambda: ss.mixture_prior(2, 1e-3, mask=mask)):
    out = call(lambda: (tx := build()).update(params, tx.init(params), params)[0])
    if out is not None:
      # An int leaf is never silently updated through a float computation.
      assert out["b"].dtype == params["b"].dtype
      np.testing.assert_array_equal(np.asarray(out["b"]), np.asarray(params["b"]))


@pytest.mark.parametrize("bad", [None, "x", 3, {"w": jnp.ones(2)}])
def test_non_quantized_arguments(bad):
  for fn in (ss.dequantize, ss.compression_report, ss.keep_clusters):
    with pytest.raises(ValueError, match="quantized"):
      fn(bad)
