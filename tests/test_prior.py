"""Tests of ``ss.mixture_prior`` against independent references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import logsumexp

import softshare_jax as ss

LOG_2PI = math.log(2 * math.pi)


def make_params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {
      "kernel": jnp.asarray(rng.normal(0.0, 0.3, (12, 9)), dtype),
      "conv": jnp.asarray(rng.normal(0.0, 0.1, (3, 3, 2, 4)), dtype),
      "bias": jnp.asarray(rng.normal(0.0, 0.5, (9,)), dtype),
  }


def make_updates(seed=1, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  p = make_params(seed + 100)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.01, x.shape), dtype), p)


def components(m):
  """means, precisions, weights of a Mixture as float64 numpy arrays."""
  return (np.asarray(m.means, np.float64), np.asarray(m.precisions, np.float64),
          np.asarray(m.weights, np.float64))


def ref_neg_log_prior_np(w, means, precs, weights):
  """−Σ log p(w) in float64 NumPy."""
  w = np.asarray(w, np.float64)[..., None]
  lj = np.log(weights) + 0.5 * np.log(precs) - 0.5 * LOG_2PI - 0.5 * precs * (w - means) ** 2
  return -np.sum(logsumexp(lj, axis=-1))


def _ref_nlp(x, means, precs, weights):
  """The hand-written −Σ log p in jnp (float64 under x64)."""
  x = x[..., None]
  lj = jnp.log(weights) + 0.5 * jnp.log(precs) - 0.5 * LOG_2PI - 0.5 * precs * (x - means) ** 2
  return -jnp.sum(jax.scipy.special.logsumexp(lj, axis=-1))


_ref_nlp_jit = jax.jit(_ref_nlp)
_ref_nlp_grad = jax.jit(jax.grad(_ref_nlp))


def ref_weight_grad(w, m):
  """∂/∂w of the hand-written float64 −Σ log p, with jax.grad under x64."""
  means, precs, weights = components(m)
  with jax.enable_x64(True):
    x = jnp.asarray(np.asarray(w, np.float64))
    args = tuple(jnp.asarray(a) for a in (means, precs, weights))
    assert x.dtype == jnp.float64
    # Sanity: the jnp function is the NumPy one.
    np.testing.assert_allclose(float(_ref_nlp_jit(x, *args)),
                               ref_neg_log_prior_np(w, means, precs, weights), rtol=1e-10)
    return np.asarray(_ref_nlp_grad(x, *args))


@pytest.mark.parametrize("zero_component", [True, False])
def test_weight_update_matches_reference(zero_component):
  strength = 3e-3
  params, updates = make_params(), make_updates()
  tx = ss.mixture_prior(5, strength, zero_component=zero_component)
  state = tx.init(params)
  out, new_state = jax.jit(tx.update)(updates, state, params)
  m = state.mixture
  assert m.num_components == 5 + int(zero_component)
  for name in ("kernel", "conv"):
    expected = np.asarray(updates[name], np.float64) + strength * ref_weight_grad(params[name], m)
    np.testing.assert_allclose(np.asarray(out[name]), expected, rtol=2e-4, atol=1e-6)
    assert np.abs(np.asarray(out[name]) - np.asarray(updates[name])).max() > 1e-4
  np.testing.assert_array_equal(np.asarray(out["bias"]), np.asarray(updates["bias"]))
  assert int(new_state.count) == 1


def test_strength_schedule_and_mask():
  params, updates = make_params(), make_updates()
  sched = optax.linear_schedule(0.0, 1e-2, 10)
  tx = ss.mixture_prior(3, sched, mask={"kernel": False, "conv": False, "bias": True})
  state = tx.init(params)
  out, state = tx.update(updates, state, params)  # strength 0 at count 0
  for k in params:
    np.testing.assert_allclose(np.asarray(out[k]), np.asarray(updates[k]), rtol=0, atol=1e-9)
  out, _ = tx.update(updates, state, params)  # strength 1e-3 at count 1
  np.testing.assert_array_equal(np.asarray(out["kernel"]), np.asarray(updates["kernel"]))
  expected = np.asarray(updates["bias"], np.float64) + 1e-3 * ref_weight_grad(params["bias"], state.mixture)
  np.testing.assert_allclose(np.asarray(out["bias"]), expected, rtol=2e-4, atol=1e-7)


def ref_mixture_cost(free, w, strength, has_zero, prior=None, zero_prior=None):
  """strength · (−Σ log p(w) + Gamma hyper-prior terms), a function of the free parameters."""
  fm, gamma, logits, zl = free
  mu = jnp.concatenate([jnp.zeros(1, fm.dtype), fm]) if has_zero else fm
  logpi = jax.nn.log_softmax(logits)
  if has_zero:
    logpi = jnp.concatenate([jax.nn.log_sigmoid(zl)[None], jax.nn.log_sigmoid(-zl) + logpi])
  lam = jnp.exp(gamma)
  lj = logpi + 0.5 * gamma - 0.5 * LOG_2PI - 0.5 * lam * (w[:, None] - mu) ** 2
  cost = -jnp.sum(jax.scipy.special.logsumexp(lj, axis=-1))
  k = gamma.shape[0]
  for pr, idx in ((prior, np.arange(int(has_zero), k)), (zero_prior, np.arange(int(has_zero)))):
    if pr is not None:
      a, b = pr
      cost = cost + jnp.sum(-(a - 1) * gamma[idx] + b * jnp.exp(gamma[idx]))
  return strength * cost


def one_sgd_step(strength, lr, **kwargs):
  """One update of mixture_prior(3, ...) with SGD on the mixture: (old, new, weights f64, old free params f64)."""
  params, updates = make_params(), make_updates()
  tx = ss.mixture_prior(3, strength, mixture_optimizer=optax.sgd(lr), **kwargs)
  state = tx.init(params)
  _, new_state = tx.update(updates, state, params)
  old, new = state.mixture, new_state.mixture
  w = np.concatenate([np.ravel(params["kernel"]), np.ravel(params["conv"])]).astype(np.float64)
  free = tuple(np.asarray(x, np.float64) for x in (old.free_means, old.log_precisions, old.logits, old.zero_logit))
  return old, new, w, free


@pytest.mark.parametrize("prior", [None, (3.0, 0.2)], ids=["no-prior", "gamma"])
@pytest.mark.parametrize("zero_component", [True, False])
def test_mixture_gradient_step(prior, zero_component):
  strength, lr = 2e-3, 0.05
  zero_prior = (2.0, 0.01) if prior is not None else None
  old, new, w, free = one_sgd_step(strength, lr, zero_component=zero_component, precision_prior=prior,
                                   zero_precision_prior=zero_prior)
  with jax.enable_x64(True):
    free = tuple(jnp.asarray(x) for x in free)
    grads = jax.jit(jax.grad(ref_mixture_cost), static_argnums=(3, 4, 5))(
        free, jnp.asarray(w), strength, zero_component, prior, zero_prior)
    grads = [np.asarray(g) for g in grads]
  for name, g in zip(("free_means", "log_precisions", "logits"), grads):
    expected = np.asarray(getattr(old, name), np.float64) - lr * g
    np.testing.assert_allclose(np.asarray(getattr(new, name)), expected, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.abs(lr * g).max() > 1e-5, name  # it did move
  # π_0 fixed (learn_zero_weight=False).
  np.testing.assert_array_equal(np.asarray(new.zero_logit), np.asarray(old.zero_logit))
  np.testing.assert_allclose(float(jnp.sum(new.weights)), 1.0, rtol=1e-6)


def test_learn_zero_weight_beta_prior():
  strength, lr = 2e-3, 0.05
  old, new, w, free = one_sgd_step(strength, lr, learn_zero_weight=True, zero_weight_prior=(5.0, 2.0))
  with jax.enable_x64(True):
    free = tuple(jnp.asarray(x) for x in free)

    def cost(f):
      z = f[3]
      beta = -(5.0 - 1) * jax.nn.log_sigmoid(z) - (2.0 - 1) * jax.nn.log_sigmoid(-z)
      return ref_mixture_cost(f, jnp.asarray(w), strength, True) + strength * beta

    g = np.asarray(jax.jit(jax.grad(cost))(free)[3])
  np.testing.assert_allclose(float(new.zero_logit), float(old.zero_logit) - lr * g, rtol=1e-5, atol=1e-7)
  assert abs(lr * g) > 1e-6


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_em_update_matches_em_step(chunk_size):
  # em_step is checked against the closed form in test_mixture.py; here the
  # statistics come from the transform's chunked pass.
  params, updates = make_params(), make_updates()
  prior = (2.0, 0.1)
  # zero_precision_prior=None: flat, as em_step's default (the transform's default is "auto").
  tx = ss.mixture_prior(4, 1e-3, mixture_update="em", precision_prior=prior, zero_precision_prior=None,
                        chunk_size=chunk_size)
  state = tx.init(params)
  _, new_state = jax.jit(tx.update)(updates, state, params)
  expected = ss.em_step(state.mixture, [params["kernel"], params["conv"]], precision_prior=prior)
  for a, e in zip(jax.tree.leaves(new_state.mixture), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("update", ["gradient", "em"])
def test_toy_two_clusters(update):
  rng = np.random.default_rng(0)
  w = np.concatenate([rng.normal(-0.5, 0.01, 1000), rng.normal(0.5, 0.01, 1000)])
  rng.shuffle(w)
  params = {"w": jnp.asarray(w.reshape(40, 50), jnp.float32)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  # Start off-centre: the range init would put the means right on the clusters.
  tx = ss.mixture_prior(2, 1e-3, zero_component=False, mixture_update=update,
                        mixture_optimizer=optax.adam(1e-2) if update == "gradient" else None)
  state = tx.init(params)
  m0 = state.mixture
  start = ss.Mixture(jnp.array([-0.2, 0.1]), jnp.full((2,), 2.0), m0.logits, m0.zero_logit, False)
  state = state._replace(mixture=start)
  step = jax.jit(tx.update)

  def body(s, _):
    _, s = step(zeros, s, params)
    return s, None

  state, _ = jax.lax.scan(body, state, None, length=300)
  np.testing.assert_allclose(np.sort(np.asarray(state.mixture.means)), [-0.5, 0.5], atol=0.02)
  np.testing.assert_allclose(np.asarray(state.mixture.weights), [0.5, 0.5], atol=0.05)


def test_get_mixture_everywhere():
  params = make_params()
  chained = optax.chain(ss.mixture_prior(3), optax.adam(1e-3))
  s = chained.init(params)
  assert ss.get_mixture(s) is s[0].mixture

  part = optax.partition({"a": ss.mixture_prior(2), "b": optax.sgd(0.1)},
                         {"kernel": "a", "conv": "a", "bias": "b"})
  m = ss.get_mixture(part.init(params))
  assert m.num_components == 3

  inj = optax.inject_hyperparams(ss.mixture_prior, static_args=("num_components",))(num_components=4,
                                                                                      strength=1e-3)
  s = inj.init(params)
  assert ss.get_mixture(s).num_components == 5
  _, s2 = jax.jit(inj.update)(make_updates(), s, params)
  assert ss.get_mixture(s2).num_components == 5
  assert not np.allclose(np.asarray(ss.get_mixture(s2).free_means), np.asarray(ss.get_mixture(s).free_means))

  two = optax.chain(ss.mixture_prior(2), ss.mixture_prior(6))
  s = two.init(params)
  assert ss.get_mixture(s).num_components == 3
  assert ss.get_mixture(s, 1).num_components == 7
  with pytest.raises(ValueError, match="index"):
    ss.get_mixture(s, 2)
  with pytest.raises(ValueError, match="MixturePriorState"):
    ss.get_mixture(optax.adam(1e-3).init(params))


@pytest.mark.parametrize("update", ["gradient", "em"])
def test_chunking_matches_unchunked(update):
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(0, 0.2, (10, 10)), jnp.float32)}
  updates = {"w": jnp.asarray(rng.normal(0, 0.01, (10, 10)), jnp.float32)}
  outs = []
  for chunk in (None, 7):
    tx = ss.mixture_prior(4, 1e-2, chunk_size=chunk, mixture_update=update)
    state = tx.init(params)
    for _ in range(2):
      out, state = tx.update(updates, state, params)
    outs.append((out, state.mixture))
  (o1, m1), (o2, m2) = outs
  np.testing.assert_allclose(np.asarray(o2["w"]), np.asarray(o1["w"]), rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(m2), jax.tree.leaves(m1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("update", ["gradient", "em"])
def test_numerics_extremes(dtype, update):
  rng = np.random.default_rng(5)
  w = rng.normal(0, 0.05, (32, 32))
  w[0, :8] = 1e3
  w[1, :8] = -1e3
  params = {"w": jnp.asarray(w, dtype)}
  updates = {"w": jnp.zeros((32, 32), dtype)}
  tx = ss.mixture_prior(64, 1e-3, mixture_update=update, chunk_size=100)
  state = tx.init(params)
  m = state.mixture
  # Precision 1e8 on some components; one far-away component with no mass.
  gamma = m.log_precisions.at[1:5].set(math.log(1e8))
  means = m.free_means.at[-1].set(1e6)
  state = state._replace(mixture=ss.Mixture(means, gamma, m.logits, m.zero_logit, True))
  step = jax.jit(tx.update)
  for _ in range(5):
    out, state = step(updates, state, params)
    assert out["w"].dtype == dtype
    assert np.all(np.isfinite(np.asarray(out["w"], np.float32)))
    for leaf in jax.tree.leaves(state.mixture):
      assert np.all(np.isfinite(np.asarray(leaf)))
    pi = np.asarray(state.mixture.weights)
    assert np.all(pi >= 0)
    np.testing.assert_allclose(pi.sum(), 1.0, rtol=1e-5)
    params = optax.apply_updates(params, out)


def test_none_updates_and_params_required():
  params, updates = make_params(), make_updates()
  tx = ss.mixture_prior(3, 1e-2)
  state = tx.init(params)
  out, _ = tx.update({**updates, "conv": None}, state, params)
  assert out["conv"] is None
  ref, _ = tx.update(updates, state, params)
  np.testing.assert_allclose(np.asarray(out["kernel"]), np.asarray(ref["kernel"]), rtol=1e-6)
  with pytest.raises(ValueError, match="params"):
    tx.update(updates, state)


def test_abstract_init_and_kmeans():
  params = make_params()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tx = ss.mixture_prior(4, init="kmeans++", key=jax.random.key(0))
  real = tx.init(params)
  fake = tx.init(abstract)
  assert jax.tree.structure(fake) == jax.tree.structure(real)
  sd = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  assert sd(fake) == sd(real)
  assert sd(jax.eval_shape(tx.init, params)) == sd(real)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_components=0), "num_components"),
        (dict(num_components=2.5), "num_components"),
        (dict(strength=-1.0), "strength"),
        (dict(zero_weight=1.0), "zero_weight"),
        (dict(zero_weight=0.0), "zero_weight"),
        (dict(precision_prior=(1.0,)), "precision_prior"),
        (dict(precision_prior=(1.0, -2.0)), "precision_prior"),
        (dict(zero_precision_prior="ab"), "zero_precision_prior"),
        (dict(zero_weight_prior=(0.0, 1.0)), "zero_weight_prior"),
        (dict(init="median"), "init"),
        (dict(init="kmeans++"), "key"),
        (dict(mixture_update="newton"), "mixture_update"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    ss.mixture_prior(**kwargs)


# ----------------------------------------------------------------------------
# Flax.


def test_flax_nnx_default_mask():
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(6, 8, rngs=rngs)
      self.l2 = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 6)), jnp.float32)
  y = jnp.sum(x, axis=1, keepdims=True)

  def train(tx, steps):
    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
      grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
      opt.update(model, grads)

    for _ in range(steps):
      step(model, opt)
    return model, opt

  prior_tx = lambda: optax.chain(ss.mixture_prior(3, 1e-2), optax.sgd(0.1))
  model, opt = train(prior_tx(), 3)
  m = ss.get_mixture(opt.opt_state)
  assert m.num_components == 4
  assert int(opt.opt_state[0].count) == 3
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  # After one step from the same init (same gradients), the biases made the
  # plain optimizer's step; the kernels were pulled by the prior.
  plain, _ = train(optax.sgd(0.1), 1)
  model, _ = train(prior_tx(), 1)
  for layer in ("l1", "l2"):
    np.testing.assert_allclose(np.asarray(getattr(model, layer).bias[...]),
                               np.asarray(getattr(plain, layer).bias[...]), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(model.l1.kernel[...]), np.asarray(plain.l1.kernel[...]), atol=1e-5)


def _linen_setup():
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(jax.nn.relu(nn.Dense(8)(x)))

  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 6)), jnp.float32)
  y = jnp.sum(x, axis=1, keepdims=True)
  model = MLP()
  params = model.init(jax.random.key(0), x)["params"]

  @jax.jit
  def step(state):
    loss = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  return model, params, step


def test_flax_linen_train_state():
  from flax.training import train_state

  model, params, step = _linen_setup()
  states = []
  for tx in (optax.sgd(0.1), optax.chain(ss.mixture_prior(3, 1e-2), optax.sgd(0.1))):
    st = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    states.append(step(st))  # one step: the same gradients for both
  plain, prior = states
  st = prior
  for _ in range(2):
    st = step(st)
  assert int(st.opt_state[0].count) == 3
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(st.params))
  for layer in ("Dense_0", "Dense_1"):
    np.testing.assert_allclose(np.asarray(prior.params[layer]["bias"]),
                               np.asarray(plain.params[layer]["bias"]), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(prior.params["Dense_0"]["kernel"]),
                         np.asarray(plain.params["Dense_0"]["kernel"]), atol=1e-5)
  assert ss.get_mixture(prior.opt_state).num_components == 4


# ----------------------------------------------------------------------------
# Orbax.


def test_orbax_checkpoint_roundtrip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  params = make_params()
  tx = optax.chain(ss.mixture_prior(4, 1e-2), optax.adam(1e-2))
  step = jax.jit(tx.update)
  state = tx.init(params)
  for i in range(3):
    out, state = step(make_updates(10 + i), state, params)
    params = optax.apply_updates(params, out)

  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  ckpt.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state})
  restored = ckpt.restore(tmp_path / "ckpt", target)
  ckpt.close()
  assert jax.tree.structure(restored) == jax.tree.structure({"params": params, "opt_state": state})

  def cont(p, s):
    for i in range(3):
      out, s = step(make_updates(20 + i), s, p)
      p = optax.apply_updates(p, out)
    return p, s

  p1, s1 = cont(params, state)
  p2, s2 = cont(restored["params"], restored["opt_state"])
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------
# Broken weights, run-time strength, memory.


@pytest.mark.parametrize("update", ["gradient", "em"])
def test_broken_weights_change_nothing_else(update):
  # Run A has an extra masked leaf [[NaN, Inf, −Inf, 1e20, 0.1]], run B the
  # same leaf without the broken weights, [[0.1]]. Every step, the healthy
  # weights' updates and the mixture must be the same (1e20 is finite, but
  # λ (w − μ)² overflows float32 for every component); the broken weights'
  # updates pass through unchanged.
  params, updates = make_params(), make_updates()
  a = {"kernel": params["kernel"], "conv": params["conv"],
       "x": jnp.array([[np.nan, np.inf, -np.inf, 1e20, 0.1]], jnp.float32)}
  a_u = {"kernel": updates["kernel"], "conv": updates["conv"], "x": jnp.array([[0.25, 1.0, 2.0, 3.0, -0.5]])}
  b = {**a, "x": jnp.array([[0.1]], jnp.float32)}
  b_u = {**a_u, "x": jnp.array([[-0.5]], jnp.float32)}
  tx = ss.mixture_prior(3, 1e-2, mixture_update=update)
  step = jax.jit(tx.update)
  s_a = s_b = tx.init(b)  # the same start (the state does not depend on the tree)
  for _ in range(3):
    out_a, s_a = step(a_u, s_a, a)
    out_b, s_b = step(b_u, s_b, b)
    for k in ("kernel", "conv"):
      np.testing.assert_allclose(np.asarray(out_a[k]), np.asarray(out_b[k]), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(out_a["x"][0, 4]), float(out_b["x"][0, 0]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out_a["x"][0, :4]), [0.25, 1.0, 2.0, 3.0])  # passed through
    for x, y in zip(jax.tree.leaves(s_a), jax.tree.leaves(s_b)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
  # The weight heals: the next steps are finite everywhere (the mixture's optimizer state too).
  out, s = step(a_u, s_a, {**a, "x": jnp.array([[0.2, 0.1, -0.3, 0.0, 0.1]], jnp.float32)})
  for leaf in jax.tree.leaves((out, s)):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


@pytest.mark.parametrize("update", ["gradient", "em"])
def test_broken_weights_in_a_chunked_leaf(update):
  # Within one leaf, through the chunked pass (50 weights in chunks of 16,
  # padding included): the same as the leaf without the broken weights.
  rng = np.random.default_rng(7)
  w = rng.normal(0, 0.3, 48).astype(np.float32)
  tx = ss.mixture_prior(3, 1e-2, mixture_update=update, zero_component=False, chunk_size=16)
  clean = {"w": jnp.asarray(w.reshape(6, 8))}
  state = tx.init(clean)
  broken = {"w": jnp.asarray(np.concatenate([w[:20], [np.nan], w[20:40], [1e20], w[40:]]).reshape(5, 10))}
  out_b, s_b = jax.jit(tx.update)({"w": jnp.zeros((5, 10))}, state, broken)
  out_c, s_c = jax.jit(tx.update)({"w": jnp.zeros((6, 8))}, state, clean)
  got = np.ravel(out_b["w"])
  np.testing.assert_allclose(np.delete(got, [20, 41]), np.ravel(out_c["w"]), rtol=1e-6, atol=1e-9)
  assert float(got[20]) == 0.0 and float(got[41]) == 0.0
  for x, y in zip(jax.tree.leaves(s_b), jax.tree.leaves(s_c)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_init_ignores_non_finite_params_and_rejects_all_broken():
  params = make_params()
  broken = {**params, "kernel": params["kernel"].at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf)}
  kernel = np.asarray(params["kernel"]).ravel()
  want = ss.init_mixture([jnp.asarray(np.delete(kernel, [0, 10])), params["conv"]], 3)
  got = ss.mixture_prior(3).init(broken).mixture
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  with pytest.raises(ValueError, match="params has no usable value"):
    ss.mixture_prior(3).init(jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params))


def test_strength_schedule_is_checked_at_run_time():
  from jax.experimental import checkify
  params, updates = make_params(), make_updates()
  # Steps 0, 1, 2, 3: fine, NaN, negative, Inf.
  tx = ss.mixture_prior(3, lambda c: jnp.array([1e-3, jnp.nan, -1e-3, jnp.inf])[jnp.minimum(c, 3)])
  state = tx.init(params)
  checked = jax.jit(checkify.checkify(tx.update))
  err, _ = checked(updates, state, params)
  err.throw()  # step 0 is fine
  for count in (1, 2, 3):
    s = state._replace(count=jnp.asarray(count, jnp.int32))
    # Eagerly the value is concrete: a ValueError naming strength.
    with pytest.raises(ValueError, match="strength must be finite and >= 0"):
      tx.update(updates, s, params)
    # Under jit: reported when the step is checkified...
    err, _ = checked(updates, s, params)
    with pytest.raises(checkify.JaxRuntimeError, match="strength must be finite and >= 0 at every step"):
      err.throw()
  # ... and free otherwise, with the documented result: NaN updates.
  out, _ = jax.jit(tx.update)(updates, state._replace(count=jnp.asarray(1, jnp.int32)), params)
  assert np.all(np.isnan(np.asarray(out["kernel"])))


def test_strength_checks_under_inject_hyperparams():
  from jax.experimental import checkify
  params, updates = make_params(), make_updates()
  tx = optax.inject_hyperparams(ss.mixture_prior, static_args=("num_components",))(3, 1e-3)
  state = tx.init(params)
  state.hyperparams["strength"] = jnp.asarray(-1.0)
  err, _ = jax.jit(checkify.checkify(tx.update))(updates, state, params)
  with pytest.raises(checkify.JaxRuntimeError, match="strength"):
    err.throw()


@pytest.mark.parametrize("update", ["gradient", "em"])
def test_memory_is_bounded_whatever_k(update):
  # The compiled step's temporaries: a few (chunk, K) float32 arrays with
  # chunk × K ≤ 2**22, i.e. tens of MB, where one (n, K) array alone would be
  # 32768 × 4001 × 4 bytes = 524 MB.
  params = {"w": jax.ShapeDtypeStruct((128, 256), jnp.float32)}
  tx = ss.mixture_prior(4000, 1e-3, mixture_update=update)
  state = jax.eval_shape(tx.init, params)
  temp = jax.jit(tx.update).lower(params, state, params).compile().memory_analysis().temp_size_in_bytes
  assert temp < 96 * 2**20, temp
