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
