"""Weight-sharing penalty, its exact prox and the Optax transform.

References are independent of the package: SciPy's isotonic regression in
float64, a brute force over every cluster structure for tiny inputs, SciPy's
SLSQP on the smooth reformulation of the QP, and finite differences.
"""

import itertools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize

import softshare_jax as ss

METHODS = ["host", "device"]


# ----------------------------------------------------------------------------
# References.


def reference_prox(x, t, l1=0.0):
  """Float64 prox of t·R + l1·|.|_1 on a 1-D array: sort, SciPy PAVA, unsort."""
  x = np.asarray(x, np.float64)
  d = x.size
  if d == 1:
    y = x.copy()
  else:
    p = np.argsort(x, kind="stable")
    k = np.arange(1, d + 1)
    v = x[p] - t / (d - 1) * (2 * k - d - 1)
    y = np.empty(d)
    y[p] = optimize.isotonic_regression(v).x
  return np.sign(y) * np.maximum(np.abs(y) - l1, 0.0)


def objective(w, x, t, l1=0.0):
  d = len(x)
  pairs = sum(abs(w[i] - w[j]) for i in range(d) for j in range(i))
  return 0.5 * np.sum((w - x) ** 2) + (t / (d - 1) * pairs if d > 1 else 0.0) + l1 * np.sum(np.abs(w))


def brute_force_prox(x, t):
  """Minimum of the objective over every consecutive-block structure of sorted x."""
  x = np.asarray(x, np.float64)
  d = x.size
  p = np.argsort(x, kind="stable")
  k = np.arange(1, d + 1)
  v = x[p] - t / (d - 1) * (2 * k - d - 1)
  best, best_w = np.inf, None
  for cuts in itertools.product([False, True], repeat=d - 1):
    ids = np.concatenate([[0], np.cumsum(cuts)])
    ws = np.array([v[ids == i].mean() for i in ids])
    w = np.empty(d)
    w[p] = ws
    f = objective(w, x, t)
    if f < best:
      best, best_w = f, w
  return best_w


def slsqp_prox(x, t, l1):
  """The prox as a smooth QP: w, u_ij >= |w_i − w_j|, s_i >= |w_i|."""
  x = np.asarray(x, np.float64)
  d = x.size
  pairs = [(i, j) for i in range(d) for j in range(i)]
  n = d + len(pairs) + d

  def f(z):
    w, u, s = z[:d], z[d : d + len(pairs)], z[d + len(pairs) :]
    return 0.5 * np.sum((w - x) ** 2) + t / (d - 1) * np.sum(u) + l1 * np.sum(s)

  cons = []
  for m, (i, j) in enumerate(pairs):
    cons.append({"type": "ineq", "fun": lambda z, m=m, i=i, j=j: z[d + m] - (z[i] - z[j])})
    cons.append({"type": "ineq", "fun": lambda z, m=m, i=i, j=j: z[d + m] + (z[i] - z[j])})
  for i in range(d):
    cons.append({"type": "ineq", "fun": lambda z, i=i: z[d + len(pairs) + i] - z[i]})
    cons.append({"type": "ineq", "fun": lambda z, i=i: z[d + len(pairs) + i] + z[i]})
  z0 = np.concatenate([x, np.zeros(len(pairs)), np.abs(x)])
  for m, (i, j) in enumerate(pairs):
    z0[d + m] = abs(x[i] - x[j])
  res = optimize.minimize(f, z0, constraints=cons, method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000})
  assert res.success, res.message
  assert n == res.x.size
  return res.x[:d]


def tol(x, t):
  return 1e-5 * (float(np.max(np.abs(x))) + t)


# ----------------------------------------------------------------------------
# Inputs, including the hard ones of docs/design.md §4.2.


def chain_input(d):
  """Each pooling merge triggers exactly one more: d rounds of pairwise pooling.

  In sorted order v = [M, 0, 1, …, d−2] with M > d(d+1)/2, so the first block
  swallows one neighbour at a time and ends as a single cluster.
  """
  m = 1.01 * d * (d + 1) / 2
  a = m / 2
  k = np.arange(1, d + 1)
  v = np.arange(d, dtype=np.float64) - 1
  v[0] = m
  return (v + a * (2 * k - d - 1)).astype(np.float32), float(a * (d - 1))


def make_input(kind, d, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "gaussian":
    return rng.normal(0, 0.05, d).astype(np.float32), 1e-4
  if kind == "moderate":
    return rng.normal(0, 1, d).astype(np.float32), 0.3
  if kind == "collapse":
    return rng.normal(0, 0.05, d).astype(np.float32), 1e3
  if kind == "chain":
    return chain_input(d)
  if kind == "ties":
    return (np.round(rng.normal(0, 1, d) * 4) / 4).astype(np.float32), 0.5
  raise ValueError(kind)


KINDS = ["gaussian", "moderate", "collapse", "chain", "ties"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [1, 2, 3, 7, 64, 4097])
def test_prox_matches_float64_reference(method, kind, d):
  x, t = make_input(kind, d)
  got = np.asarray(jax.jit(lambda x: ss.prox_weight_sharing(x, t, method=method))(x))
  np.testing.assert_allclose(got, reference_prox(x, t), rtol=0, atol=tol(x, t))


@pytest.mark.parametrize(
    "method,kind,d",
    [
        ("host", "gaussian", 10**7),
        ("host", "collapse", 10**7),
        ("host", "chain", 10**6),
        ("device", "gaussian", 10**7),
        ("device", "moderate", 10**6),
        ("device", "collapse", 10**6),
        ("device", "chain", 10**5),
        ("device", "ties", 10**6),
    ],
)
def test_prox_large_inputs(method, kind, d):
  x, t = make_input(kind, d)
  got = np.asarray(jax.jit(lambda x: ss.prox_weight_sharing(x, t, method=method))(x))
  np.testing.assert_allclose(got, reference_prox(x, t), rtol=0, atol=tol(x, t))


def test_chain_defeats_pooling_so_the_bounded_depth_pass_runs():
  # Each round of parallel pooling merges one more element of a chain, so a
  # 200-element chain leaves violations after the pooling rounds; the result is
  # still exact, which is the divide-and-conquer pass at work.
  from softshare_jax import isotonic

  x, t = chain_input(200)
  z = jnp.sort(jnp.asarray(x))[None]
  a = jnp.asarray([t / 199], jnp.float32)
  seg = isotonic.Segments(z, a)
  v = z - isotonic.ramp(200, a)
  y, starts = isotonic.pool(seg, v, isotonic.POOLING_ROUNDS)
  assert bool(jnp.any(isotonic.violations(y, starts)))
  fit = isotonic.isotonic_fit_sorted(z, a)
  np.testing.assert_allclose(np.asarray(fit[0]), np.sort(reference_prox(x, t)), atol=tol(x, t))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(12))
def test_prox_equals_brute_force(method, seed):
  rng = np.random.default_rng(seed)
  d = 2 + seed % 5
  x = rng.normal(size=d).astype(np.float32)
  t = float(rng.choice([0.05, 0.3, 1.0, 3.0]))
  got = np.asarray(ss.prox_weight_sharing(x, t, method=method))
  np.testing.assert_allclose(got, brute_force_prox(x, t), atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_prox_with_l1_equals_qp(seed):
  rng = np.random.default_rng(100 + seed)
  d = 2 + seed % 4
  x = rng.normal(size=d)
  t, l1 = 0.4, 0.3
  got = np.asarray(ss.prox_weight_sharing(x.astype(np.float32), t, l1=l1))
  np.testing.assert_allclose(got, slsqp_prox(x, t, l1), atol=1e-4)


# ----------------------------------------------------------------------------
# Properties (docs/design.md §4.2).

# A few sizes only: every new size compiles the device kernel again.
vectors = hnp.arrays(
    np.float32,
    st.sampled_from([2, 3, 5, 8, 13, 40]),
    elements=st.floats(-10, 10, width=32, allow_subnormal=False),
)
strengths = st.floats(0, 5)


@hypothesis.given(x=vectors, t=strengths, method=st.sampled_from(METHODS))
def test_order_kept_mean_kept_bounded_moves(x, t, method):
  y = np.asarray(ss.prox_weight_sharing(x, t, method=method), np.float64)
  scale = tol(x, t)
  order = np.argsort(x, kind="stable")
  assert np.all(np.diff(y[order]) >= -scale)
  assert abs(y.mean() - x.astype(np.float64).mean()) <= scale
  assert np.all(np.abs(y - x) <= t + scale)


@hypothesis.given(x=vectors, method=st.sampled_from(METHODS))
def test_zero_strength_is_identity_and_large_strength_is_the_mean(x, method):
  np.testing.assert_array_equal(np.asarray(ss.prox_weight_sharing(x, 0.0, method=method)), x)
  spread = float(np.ptp(x)) + 1.0
  y = np.asarray(ss.prox_weight_sharing(x, spread * x.size, method=method))
  np.testing.assert_allclose(y, np.full_like(y, x.astype(np.float64).mean()), atol=tol(x, spread * x.size))


@hypothesis.given(x=vectors, t=strengths, seed=st.integers(0, 2**31 - 1), method=st.sampled_from(METHODS))
def test_permutation_equivariance(x, t, seed, method):
  perm = np.random.default_rng(seed).permutation(x.size)
  y = np.asarray(ss.prox_weight_sharing(x, t, method=method))
  yp = np.asarray(ss.prox_weight_sharing(x[perm], t, method=method))
  np.testing.assert_allclose(yp, y[perm], atol=tol(x, t))


@hypothesis.given(x=vectors, t=strengths, l1=st.floats(0, 3))
def test_l1_is_soft_threshold_after_the_prox(x, t, l1):
  y = np.asarray(ss.prox_weight_sharing(x, t), np.float64)
  soft = np.sign(y) * np.maximum(np.abs(y) - l1, 0)
  np.testing.assert_allclose(np.asarray(ss.prox_weight_sharing(x, t, l1=l1)), soft, atol=tol(x, t + l1))
  np.testing.assert_allclose(np.asarray(ss.prox_weight_sharing(x, t, l1=l1)), reference_prox(x, t, l1), atol=tol(x, t + l1))


# ----------------------------------------------------------------------------
# Groups, dtypes, transformations.


@pytest.mark.parametrize("axis", [None, 0, 1, (0, 2), -1, (2, 0)])
def test_axis_groups_are_independent_prox_calls(axis):
  x = np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32)
  got = np.asarray(ss.prox_weight_sharing(x, 0.7, axis=axis))
  axes = tuple(range(3)) if axis is None else tuple(sorted(a % 3 for a in np.atleast_1d(axis)))
  rest = tuple(a for a in range(3) if a not in axes)
  moved = np.transpose(x, rest + axes)
  rows = moved.reshape(-1, int(np.prod([x.shape[a] for a in axes])))
  want = np.stack([reference_prox(r, 0.7) for r in rows]).reshape(moved.shape)
  want = np.transpose(want, np.argsort(rest + axes))
  np.testing.assert_allclose(got, want, atol=tol(x, 0.7))


def test_dense_kernel_axis0_is_one_group_per_output_neuron():
  w = np.random.default_rng(2).normal(size=(10, 3)).astype(np.float32)
  got = np.asarray(ss.prox_weight_sharing(w, 0.5, axis=0))
  for j in range(3):
    np.testing.assert_allclose(got[:, j], reference_prox(w[:, j], 0.5), atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("method", METHODS)
def test_low_precision_computed_in_float32_returned_in_dtype(dtype, method):
  x = jnp.asarray(np.random.default_rng(3).normal(size=50), dtype)
  got = ss.prox_weight_sharing(x, 0.2, method=method)
  assert got.dtype == dtype
  want = reference_prox(np.asarray(x, np.float32), 0.2)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=float(jnp.finfo(dtype).eps) * 4)


@pytest.mark.parametrize("method", METHODS + ["auto"])
def test_vmap_matches_a_loop(method):
  x = np.random.default_rng(4).normal(size=(3, 20)).astype(np.float32)
  ts = np.array([0.0, 0.3, 2.0], np.float32)
  got = jax.jit(jax.vmap(lambda x, t: ss.prox_weight_sharing(x, t, method=method)))(x, ts)
  for i in range(3):
    np.testing.assert_allclose(np.asarray(got[i]), reference_prox(x[i], float(ts[i])), atol=tol(x, 2.0))


def test_traced_strength_under_jit():
  x = np.random.default_rng(5).normal(size=30).astype(np.float32)
  f = jax.jit(lambda x, t: ss.prox_weight_sharing(x, t))
  for t in [0.1, 1.0]:
    np.testing.assert_allclose(np.asarray(f(x, t)), reference_prox(x, t), atol=tol(x, t))


# ----------------------------------------------------------------------------
# Derivatives.


def _generic_input():
  # Well-separated values: clusters stay the same under small perturbations.
  x = np.array([0.0, 0.02, 0.5, 0.53, 0.55, 1.4, -0.9, -0.7, 2.0, 0.3], np.float32)
  return x


@pytest.mark.parametrize("method", METHODS)
def test_jvp_matches_finite_differences(method):
  x = _generic_input()
  t, l1 = 0.25, 0.25
  f = lambda x, t, l1: ss.prox_weight_sharing(x, t, l1=l1, method=method)  # noqa: E731
  y = np.asarray(f(x, t, l1))
  assert 2 < len(np.unique(y)) < x.size  # real clusters and real zeros
  assert np.any(y == 0)
  rng = np.random.default_rng(6)
  for _ in range(3):
    dx = rng.normal(size=x.size).astype(np.float32)
    dt, dl = float(rng.normal()), float(rng.normal())
    _, tangent = jax.jvp(f, (jnp.asarray(x), jnp.float32(t), jnp.float32(l1)), (jnp.asarray(dx), jnp.float32(dt), jnp.float32(dl)))
    eps = 1e-3
    xp, xm = (x.astype(np.float64) + s * eps * dx for s in (1, -1))
    fd = (reference_prox(xp, t + eps * dt, l1 + eps * dl) - reference_prox(xm, t - eps * dt, l1 - eps * dl)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(tangent), fd, atol=2e-3)


def test_grad_inside_a_cluster_is_the_mean():
  x = jnp.array([0.0, 0.01, 5.0])
  g = jax.grad(lambda x: ss.prox_weight_sharing(x, 0.1)[0])(x)
  np.testing.assert_allclose(np.asarray(g), [0.5, 0.5, 0.0], atol=1e-6)


# ----------------------------------------------------------------------------
# The penalty.


@pytest.mark.parametrize("d", [1, 2, 3, 10, 57])
def test_penalty_equals_pairwise_definition(d):
  x = np.random.default_rng(d).normal(size=d).astype(np.float32)
  want = sum(abs(float(x[i]) - float(x[j])) for i in range(d) for j in range(i)) / max(d - 1, 1)
  np.testing.assert_allclose(float(ss.weight_sharing_penalty(x)), want, rtol=1e-5)


def test_penalty_grad_and_axis():
  x = np.random.default_rng(7).normal(size=(6, 4)).astype(np.float32)
  g = np.asarray(jax.grad(ss.weight_sharing_penalty)(jnp.asarray(x)))
  ranks = np.argsort(np.argsort(x.ravel())) + 1
  np.testing.assert_allclose(g.ravel(), (2 * ranks - x.size - 1) / (x.size - 1), rtol=1e-6)
  per_col = sum(float(ss.weight_sharing_penalty(x[:, j])) for j in range(4))
  np.testing.assert_allclose(float(ss.weight_sharing_penalty(x, axis=0)), per_col, rtol=1e-5)


def test_prox_lowers_the_objective():
  x = np.random.default_rng(8).normal(size=8)
  y = np.asarray(ss.prox_weight_sharing(x.astype(np.float32), 0.5), np.float64)
  for _ in range(20):
    other = y + np.random.default_rng(_).normal(scale=1e-2, size=8)
    assert objective(y, x, 0.5) <= objective(other, x, 0.5) + 1e-6


# ----------------------------------------------------------------------------
# Bad arguments.


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(strength=-1.0), "strength"),
        (dict(strength=float("inf")), "strength"),
        (dict(strength=float("nan")), "strength"),
        (dict(strength=0.1, l1=-0.1), "l1"),
        (dict(strength=0.1, axis=3), "axis"),
        (dict(strength=0.1, axis=(0, 0)), "axis"),
        (dict(strength=0.1, method="gpu"), "method"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    ss.prox_weight_sharing(jnp.ones((3, 4)), **kwargs)


def test_integer_input_is_rejected():
  with pytest.raises(ValueError, match="x must be a floating-point"):
    ss.prox_weight_sharing(jnp.arange(4), 0.1)
  with pytest.raises(ValueError, match="x must be a floating-point"):
    ss.weight_sharing_penalty(jnp.arange(4))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(strength=-1.0, learning_rate=0.1), "strength"),
        (dict(strength=1.0, learning_rate=-0.1), "learning_rate"),
        (dict(strength=1.0, learning_rate=0.1, l1=-1.0), "l1"),
        (dict(strength=1.0, learning_rate=0.1, method="fast"), "method"),
    ],
)
def test_transform_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    ss.weight_sharing_prox(**kwargs)


def test_transform_needs_params():
  tx = ss.weight_sharing_prox(0.1, 0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.ones(3)}))


# ----------------------------------------------------------------------------
# The transform.


def test_transform_is_prox_of_tentative_step_with_schedule_and_mask():
  rng = np.random.default_rng(9)
  params = {"w": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=4), jnp.float32)}
  lr = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
  tx = optax.chain(optax.sgd(lr), ss.weight_sharing_prox(2.0, lr, l1=0.5, axis=0, mask={"w": True, "b": False}))
  state = tx.init(params)
  for step in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = tx.update(grads, state, params)
    eta = 0.1 * 0.5**step
    tentative = {k: np.asarray(params[k], np.float64) - eta * np.asarray(grads[k], np.float64) for k in params}
    want_w = np.stack([reference_prox(tentative["w"][:, j], 2.0 * eta, 0.5 * eta) for j in range(4)], axis=1)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(new["w"]), want_w, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new["b"]), tentative["b"], atol=1e-6)
    params = new


def test_sharing_stats_counts():
  params = {"a": jnp.array([[0.0, 1.0], [1.0, 0.0]]), "b": jnp.array([2.0, 3.0, 3.0]), "n": jnp.arange(3)}
  stats = ss.sharing_stats(params)
  assert set(stats.leaves) == {"a", "b"}  # integers are not weights
  assert stats.leaves["a"] == ss.LeafStats(weights=4, distinct=2, zeros=2)
  assert stats.leaves["b"] == ss.LeafStats(weights=3, distinct=2, zeros=0)
  assert stats.total == ss.LeafStats(weights=7, distinct=4, zeros=2)
  assert ss.sharing_stats(params, mask={"a": False, "b": True, "n": False}).total.weights == 3
  assert "total" in str(stats)
  assert stats.to_dict()["total"]["distinct"] == 4


# ----------------------------------------------------------------------------
# Host kernels: the C kernel and its NumPy/SciPy fallback.


@pytest.mark.parametrize("kernel", ["prox_rows_host", "prox_rows_numpy"])
@pytest.mark.parametrize("kind", KINDS)
def test_host_kernels_on_several_rows(kernel, kind):
  from softshare_jax import isotonic

  rows = [make_input(kind, 300, seed) for seed in range(4)]
  x = np.stack([r[0] for r in rows])
  t = np.array([r[1] for r in rows])
  got = getattr(isotonic, kernel)(x, t)
  for i in range(4):
    np.testing.assert_allclose(got[i], reference_prox(x[i], t[i]), rtol=0, atol=tol(x[i], t[i]))


def test_c_kernel_is_built_where_a_compiler_is():
  import shutil

  from softshare_jax import isotonic

  if not (shutil.which("cc") or shutil.which("gcc")):
    pytest.skip("no C compiler: the host method uses the NumPy fallback")
  assert isotonic.host_kernel is not None, "the C host kernel did not build: reinstall with `make clean test`"


# ----------------------------------------------------------------------------
# Reliability: large strengths, empty and scalar leaves, non-finite rows,
# float64, exact clusters after optax.apply_updates.

from softshare_jax import isotonic  # noqa: E402

KERNELS = {
    "host": isotonic.prox_rows_host,
    "numpy": isotonic.prox_rows_numpy,
    "device": lambda x, t: np.asarray(jax.jit(isotonic.prox_rows_device)(jnp.asarray(x), jnp.asarray(t, x.dtype))),
}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("t", [1e3, 1e16, 1e20, 1e38, np.inf])
def test_kernels_give_the_exact_mean_for_any_large_strength(kernel, t):
  # The mean 11.625 is a float32: every entry must be it, bit for bit. The
  # second row sits far from 0 with a tiny spread: the ramp must not eat it.
  x = np.array([[11, 12, 13, 10.5], [1000.0, 1000.125, 999.875, 1000.25]], np.float32)
  got = KERNELS[kernel](x, np.full(2, t, np.float32 if kernel == "device" else np.float64))
  np.testing.assert_array_equal(got, [[11.625] * 4, [1000.0625] * 4])


@pytest.mark.parametrize("method", METHODS + ["auto"])
@pytest.mark.parametrize("strength", [1e16, 1e20, 1e38, 1e39, 1e300])
def test_prox_large_strength_is_the_group_mean(method, strength):
  x = jnp.array([[11, 12, 13, 10.5], [-3.0, 5.0, 1.0, 1.5]])
  got = np.asarray(ss.prox_weight_sharing(x, strength, axis=1, method=method))
  np.testing.assert_array_equal(got, [[11.625] * 4, [1.125] * 4])
  tx = ss.weight_sharing_prox(strength, 1.0, axis=1, method=method)
  u, _ = tx.update(jnp.zeros_like(x), tx.init(x), x)
  np.testing.assert_array_equal(np.asarray(optax.apply_updates(x, u)), [[11.625] * 4, [1.125] * 4])


@hypothesis.settings(max_examples=10)
@hypothesis.given(x=vectors, method=st.sampled_from(METHODS))
def test_strength_above_the_spread_collapses_exactly(x, method):
  # From t = (max − min)(d − 1)/d on, the prox is the mean; at and above the
  # spread every entry must be one float, within float32 rounding of the mean.
  for k in (1.0, 1.5, 1e3, 1e12, 1e30):
    t = k * (float(np.ptp(x)) + 1e-3)
    y = np.asarray(ss.prox_weight_sharing(x, t, method=method))
    assert np.unique(y).size == 1, k
    np.testing.assert_allclose(y[0], x.astype(np.float64).mean(), rtol=0, atol=1e-6 * (np.abs(x).max() + 1))


@pytest.mark.parametrize("method", METHODS)
def test_strength_just_below_the_collapse_matches_the_reference(method):
  # The shortcut must not fire early: at t = 0.9 (max − min)(d − 1)/d a
  # two-point row is still two clusters.
  x = np.array([0.0, 1.0], np.float32)
  t = 0.9 * 1.0 * 1 / 2
  np.testing.assert_allclose(np.asarray(ss.prox_weight_sharing(x, t, method=method)), reference_prox(x, t), atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shape,axis", [((0,), None), ((0,), 0), ((3, 0), 1), ((3, 0), 0), ((0, 4), 1), ((0, 4), None), ((2, 0, 3), (1, 2))]
)
def test_empty_in_empty_out(method, shape, axis):
  x = jnp.zeros(shape, jnp.bfloat16)
  got = ss.prox_weight_sharing(x, 0.1, l1=0.1, axis=axis, method=method)
  assert got.shape == shape and got.dtype == x.dtype
  assert float(ss.weight_sharing_penalty(x, axis=axis)) == 0.0


@pytest.mark.parametrize("axis", [None, ()])
def test_scalar_is_one_group_of_one(axis):
  x = jnp.float32(2.0)
  assert float(ss.prox_weight_sharing(x, 5.0, axis=axis)) == 2.0
  assert float(ss.prox_weight_sharing(x, 5.0, l1=0.5, axis=axis)) == 1.5
  assert float(ss.weight_sharing_penalty(x, axis=axis)) == 0.0


@pytest.mark.parametrize("axis", [0, -1, (0,)])
def test_scalar_with_an_axis_is_out_of_range(axis):
  with pytest.raises(ValueError, match=r"axis .* out of range for an array of rank 0"):
    ss.prox_weight_sharing(jnp.float32(2.0), 0.1, axis=axis)
  with pytest.raises(ValueError, match=r"axis .* out of range for an array of rank 0"):
    ss.weight_sharing_penalty(jnp.float32(2.0), axis=axis)


def test_transform_on_a_tree_with_empty_and_scalar_leaves():
  params = {"w": jnp.array([0.3, 0.31, -0.2, 0.9]), "e": jnp.zeros((0, 4)), "s": jnp.float32(2.0)}
  grads = jax.tree.map(jnp.zeros_like, params)
  tx = optax.chain(optax.sgd(0.1), ss.weight_sharing_prox(0.5, 0.1, l1=1.0))
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert updates["e"].shape == (0, 4)
  assert updates["s"] + params["s"] == np.float32(1.9)  # a group of one: only the l1 step
  np.testing.assert_allclose(np.asarray(updates["w"]) + np.asarray(params["w"]),
                             reference_prox(np.asarray(params["w"]), 0.05, 0.1), atol=1e-6)
  # A per-column axis cannot apply to the scalar: the error names the leaf.
  tx = ss.weight_sharing_prox(0.5, 0.1, axis=0)
  with pytest.raises(ValueError, match=r"leaf 's'.*axis 0 is out of range"):
    tx.update(grads, tx.init(params), params)


def _rows_with_non_finite_values():
  rng = np.random.default_rng(11)
  x = rng.normal(size=(8, 6)).astype(np.float32)
  x[1, 2] = np.nan
  x[3, 0] = np.inf
  x[4, 5] = -np.inf
  x[6, 1] = 1e30  # finite: its own row is fitted, no other row may feel it
  return x, np.array([0.3, 0.3, 0.5, 0.3, 0.3, 0.7, 0.3, 2.0])


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernels_keep_rows_independent_whatever_they_hold(kernel):
  x, t = _rows_with_non_finite_values()
  got = KERNELS[kernel](x, t)
  bad = ~np.isfinite(x).all(axis=1)
  assert np.isnan(got[bad]).all()  # NaN or Inf in: the whole row NaN
  for r in np.flatnonzero(~bad):  # every other row as if it were alone
    np.testing.assert_allclose(got[r], reference_prox(x[r], t[r]), rtol=1e-6, atol=tol(x[r], t[r]))
  np.testing.assert_allclose(got[6, [0, 2, 3, 4, 5]], reference_prox(x[6], t[6])[[0, 2, 3, 4, 5]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernels_strength_zero_invalid_strength_and_one_column(kernel):
  x, _ = _rows_with_non_finite_values()
  same = KERNELS[kernel](x, np.zeros(8))
  np.testing.assert_array_equal(same, x)  # t = 0: the row itself, NaN and Inf included
  t = np.array([np.nan, -1.0, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3])
  got = KERNELS[kernel](x, t)
  assert np.isnan(got[:2]).all() and np.isfinite(got[[2, 5, 6, 7]]).all()
  col = KERNELS[kernel](x[:, :1], np.full(8, 0.3))
  np.testing.assert_array_equal(col, x[:, :1])  # d = 1: R = 0, the identity


@hypothesis.settings(max_examples=10)
@hypothesis.given(
    x=hnp.arrays(np.float32, (4, 7), elements=st.floats(-10, 10, width=32)),
    holes=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 6), st.sampled_from([np.nan, np.inf, -np.inf, 1e30])),
                   max_size=3),
    t=st.floats(0.01, 5),
)
def test_the_three_kernels_agree_on_rows_with_non_finite_values(x, holes, t):
  x = x.copy()
  for r, c, v in holes:
    x[r, c] = v
  out = {k: f(x, np.full(4, t)) for k, f in KERNELS.items()}
  for r in range(4):
    if not np.isfinite(x[r]).all():
      for k in out:
        assert np.isnan(out[k][r]).all(), k
      continue
    want = reference_prox(x[r], t)
    for k in out:
      np.testing.assert_allclose(out[k][r], want, rtol=0, atol=tol(x[r], t), err_msg=k)


@pytest.mark.parametrize("method", METHODS)
def test_prox_nan_group_is_nan_other_groups_untouched(method):
  x = np.random.default_rng(12).normal(size=(5, 3)).astype(np.float32)
  x[2, 1] = np.nan
  got = np.asarray(ss.prox_weight_sharing(x, 0.4, axis=0, method=method))
  assert np.isnan(got[:, 1]).all()
  for j in (0, 2):
    np.testing.assert_allclose(got[:, j], reference_prox(x[:, j], 0.4), atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_traced_nan_or_negative_strength_gives_nan_not_a_wrong_answer(method):
  x = jnp.array([0.0, 0.05, 1.0])
  f = jax.jit(lambda t, s: ss.prox_weight_sharing(x, t, l1=s, method=method))
  for t, s in [(jnp.nan, 0.0), (-0.1, 0.0), (0.1, jnp.nan), (0.1, -0.1)]:
    assert np.isnan(np.asarray(f(t, s))).all(), (t, s)
  g = jax.jit(lambda t: ss.prox_weight_sharing(jnp.ones((3, 1)), t, axis=1, method=method))
  assert np.isnan(np.asarray(g(-1.0))).all()


# float64 (x64 switched on only inside these tests).


@pytest.mark.parametrize("method", METHODS)
def test_float64_prox_is_computed_in_float64(method):
  rng = np.random.default_rng(13)
  x = 1.0 + rng.normal(size=40) * 1e-9  # spacings far below float32's ulp of 1
  t = 3e-9
  with jax.enable_x64(True):
    got = ss.prox_weight_sharing(jnp.asarray(x, jnp.float64), t, method=method)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), reference_prox(x, t), rtol=0, atol=1e-15)
    big = ss.prox_weight_sharing(jnp.asarray(x, jnp.float64), 1e30, method=method)
    np.testing.assert_allclose(np.asarray(big), np.full(40, x.mean()), rtol=0, atol=1e-15)
    same = ss.prox_weight_sharing(jnp.full(40, 0.22876222127045265, jnp.float64), 1.0, method=method)
    np.testing.assert_array_equal(np.asarray(same), np.full(40, 0.22876222127045265))  # 40 v / 40 != v
  assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("kernel", ["host", "numpy"])
def test_host_kernels_take_float64_rows(kernel):
  rng = np.random.default_rng(14)
  x = 1.0 + rng.normal(size=(4, 50)) * 1e-9
  x[3] = 0.8444218515250481  # all equal: kept bit for bit (50 · v / 50 does not round back)
  got = KERNELS[kernel](x, np.array([0.0, 2e-9, 1.0, 5.0]))
  assert got.dtype == np.float64
  np.testing.assert_array_equal(got[0], x[0])
  np.testing.assert_allclose(got[1], reference_prox(x[1], 2e-9), rtol=0, atol=1e-15)
  np.testing.assert_allclose(got[2], np.full(50, x[2].mean()), rtol=0, atol=1e-15)
  np.testing.assert_array_equal(got[3], x[3])


@pytest.mark.parametrize("method", METHODS)
def test_float64_training_does_not_stall(method):
  # An update of 1e-10 on a weight of 1.0 must survive the prox step.
  with jax.enable_x64(True):
    params = {"w": jnp.array([1.0, 2.0, 3.0, 5.0], jnp.float64)}
    grads = {"w": jnp.full(4, -1e-10, jnp.float64)}
    for strength in (0.0, 1e-12):
      tx = optax.chain(optax.sgd(1.0), ss.weight_sharing_prox(strength, 1.0, method=method))
      updates, _ = tx.update(grads, tx.init(params), params)
      assert updates["w"].dtype == jnp.float64
      new = np.asarray(optax.apply_updates(params, updates)["w"])
      want = reference_prox(np.array([1.0, 2.0, 3.0, 5.0]) + 1e-10, strength)
      np.testing.assert_allclose(new, want, rtol=0, atol=1e-15)
  assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
@pytest.mark.parametrize("traced", [False, True])
def test_strength_zero_is_the_identity_on_the_update(dtype, traced):
  with jax.enable_x64(True):
    rng = np.random.default_rng(15)
    params = {"w": jnp.asarray(1.0 + rng.normal(size=(6, 5)), dtype)}
    updates = {"w": jnp.asarray(rng.normal(size=(6, 5)) * 1e-4, dtype)}
    make = lambda strength: ss.weight_sharing_prox(strength, 0.1, axis=0)  # noqa: E731
    if traced:  # the hyperparameter in float32 whatever the params' dtype
      tx = optax.inject_hyperparams(make, hyperparam_dtype=jnp.float32)(strength=0.0)
      out, _ = jax.jit(tx.update)(updates, tx.init(params), params)
    else:
      tx = make(0.0)
      out, _ = tx.update(updates, tx.init(params), params)
    assert out["w"].dtype == updates["w"].dtype
    np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(updates["w"]))
  assert not jax.config.jax_enable_x64


# Exact clusters after optax.apply_updates.


def _distinct_per_column(a):
  a = np.asarray(a)
  return [np.unique(a[:, j]).size for j in range(a.shape[1])]


def test_small_moves_land_exactly_on_the_prox():
  # Every weight moves by less than half its magnitude: target − p is exact
  # (Sterbenz), so the update must land on the prox bit for bit (the landing
  # is the same code for every method: host only).
  method = "host"
  rng = np.random.default_rng(16)
  params = jnp.asarray(np.sign(rng.normal(size=(32, 32))) * (1.0 + rng.random((32, 32))), jnp.float32)
  grads = jnp.asarray(rng.normal(size=(32, 32)) * 0.01, jnp.float32)
  tx = ss.weight_sharing_prox(0.2, 1.0, axis=0, method=method)
  updates, _ = tx.update(-grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  direct = ss.prox_weight_sharing(params - grads, 0.2, axis=0, method=method)
  assert sum(_distinct_per_column(direct)) < 32 * 32  # clusters formed
  np.testing.assert_array_equal(np.asarray(new), np.asarray(direct))
  assert _distinct_per_column(new) == _distinct_per_column(direct)


@pytest.mark.parametrize("seed", range(3))
def test_clusters_stay_bit_identical_after_apply_updates_where_floats_allow(seed):
  # Weights cross zero: p + (c − p) need not be c, and the members of a
  # cluster at c would round to different values. A member whose move |c − p|
  # stays below the top of its own binade (2^(⌊log2 |p|⌋ + 1)) reaches every
  # value on its own grid, so a cluster of such members must come back as one
  # value; every weight lands within an ulp of |c| + B of the prox (B: the
  # group's largest move).
  rng = np.random.default_rng(seed)
  params = jnp.asarray(rng.normal(size=(32, 32)) * 0.1, jnp.float32)
  grads = jnp.asarray(rng.normal(size=(32, 32)) * 0.01, jnp.float32)
  tx = ss.weight_sharing_prox(0.2, 1.0, axis=0)
  updates, _ = jax.jit(tx.update)(-grads, tx.init(params), params)
  new = np.asarray(optax.apply_updates(params, updates))
  direct = np.asarray(ss.prox_weight_sharing(params - grads, 0.2, axis=0))
  p = np.asarray(params)
  plain = np.float32(p + (direct - p))
  bound = np.abs(direct - p).max(axis=0)
  landable = plain_split = 0
  for j in range(32):
    for c in np.unique(direct[:, j]):
      m = direct[:, j] == c
      assert np.all(np.abs(new[m, j] - c) <= np.spacing(np.float32(abs(c) + bound[j]))), (j, c)
      top = 2.0 ** (np.floor(np.log2(np.abs(p[m, j]) + 1e-45)) + 1)
      within = (p[m, j] == 0) | (np.abs(np.float64(c) - p[m, j]) * (1 + 2**-20) < top)
      if m.sum() > 1 and within.all():
        landable += 1
        plain_split += np.unique(plain[m, j]).size > 1
        assert np.unique(new[m, j]).size == 1, (j, c, p[m, j], new[m, j])
  assert plain_split > 0 and landable > plain_split  # the case is really exercised
