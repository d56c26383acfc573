"""Tying: soft_tie, hard_tie, sync.

References are independent of the package: ``jax.grad`` of a penalty written
out by hand (the pairwise form), NumPy sums of the members' updates, and a
tied autoencoder written with ONE shared matrix (plain JAX) that the tied
models (plain dict, Flax Linen, Flax NNX) must follow step for step.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import softshare_jax as ss

T = ss.transposed


def rand(seed, shape, scale=1.0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(0.0, scale, shape), dtype)


def three_way_params(seed=0):
  """A group of three members (one transposed), a square self-tied leaf, a square
  pair (one transposed: shapes alone cannot tell which way), a free leaf."""
  return {
      "a": rand(seed, (3, 5)),
      "b": rand(seed + 1, (5, 3)),
      "c": {"w": rand(seed + 2, (3, 5))},
      "k": rand(seed + 3, (4, 4)),
      "free": rand(seed + 4, (7,)),
      "s": rand(seed + 5, (4, 4)),
      "t": rand(seed + 6, (4, 4)),
  }


THREE_WAY = [["a", T("b"), "c/w"], ["k", T("k")], ["s", T("t")]]


def pairwise(views, strength):
  """λ/2 Σ_m ‖v_m − v̄‖², written as λ/(2n) Σ_{i<j} ‖v_i − v_j‖² (the same value)."""
  n = len(views)
  return strength / (2 * n) * sum(jnp.sum((views[i] - views[j]) ** 2) for i in range(n) for j in range(i))


def pairwise_penalty(params, strength):
  """The penalty of THREE_WAY, by hand."""
  k = params["k"]
  return (pairwise([params["a"], params["b"].T, params["c"]["w"]], strength)
          + pairwise([k, k.T], strength)
          + pairwise([params["s"], params["t"].T], strength))


# ----------------------------------------------------------------------------
# soft_tie.


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_soft_tie_is_grad_of_penalty(jit):
  params, grads = three_way_params(0), three_way_params(10)
  strength = 0.7
  tx = ss.soft_tie(THREE_WAY, strength)
  update = jax.jit(tx.update) if jit else tx.update
  out, state = update(grads, tx.init(params), params)
  ref = jax.grad(pairwise_penalty)(params, strength)
  for path in ("a", "b", "k", "s", "t"):
    np.testing.assert_allclose(out[path] - grads[path], ref[path], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["c"]["w"] - grads["c"]["w"], ref["c"]["w"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["free"], grads["free"])  # In no group: untouched.
  assert np.abs(np.asarray(ref["a"])).max() > 0.1  # The reference is not trivially zero.
  assert int(state.count) == 1


def test_soft_tie_pair_is_the_classic_pull():
  """For a pair, the pull on a is λ/2 (a − b): the gradient of λ/4 ‖a − b‖²."""
  a, b = np.array([1.0, -2.0, 4.0]), np.array([3.0, 0.0, 4.0])
  params = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  out, _ = ss.soft_tie([["a", "b"]], 0.5).update(zeros, ss.SoftTieState(jnp.zeros([], jnp.int32)), params)
  np.testing.assert_allclose(out["a"], 0.25 * (a - b), rtol=1e-6)
  np.testing.assert_allclose(out["b"], 0.25 * (b - a), rtol=1e-6)
  classic = jax.grad(lambda p: 0.5 / 4 * jnp.sum((p["a"] - p["b"]) ** 2))(params)
  np.testing.assert_allclose(out["a"], classic["a"], rtol=1e-6)


def test_soft_tie_zero_strength_is_identity():
  params, grads = three_way_params(0), three_way_params(10)
  tx = ss.soft_tie(THREE_WAY, 0.0)
  out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for o, g in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(o, g)


def test_soft_tie_schedule_uses_the_step_count():
  params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0, 0.0])}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = ss.soft_tie([["a", "b"]], lambda count: 0.5 * (count + 1))
  state = tx.init(params)
  for step in range(3):
    out, state = tx.update(zeros, state, params)
    lam = 0.5 * (step + 1)
    np.testing.assert_allclose(out["a"], lam / 2 * (np.array([1.0, 2.0]) - np.array([3.0, 0.0])), rtol=1e-6)


def test_soft_tie_none_updates_pass_through():
  params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0, 0.0]), "c": jnp.array([5.0, 1.0])}
  grads = {"a": None, "b": jnp.array([0.1, 0.2]), "c": jnp.array([0.0, 0.0])}
  tx = ss.soft_tie([["a", "b", "c"]], 1.0)
  for update in (tx.update, jax.jit(tx.update)):
    out, _ = update(grads, tx.init(params), params)
    assert out["a"] is None
    mean = np.array([3.0, 1.0])  # a's weights still count in the mean.
    np.testing.assert_allclose(out["b"], np.array([0.1, 0.2]) + (np.array([3.0, 0.0]) - mean), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["c"], np.array([5.0, 1.0]) - mean, rtol=1e-6, atol=1e-6)


def test_soft_tie_keeps_dtype():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), three_way_params(0))
  grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), three_way_params(10))
  tx = ss.soft_tie(THREE_WAY, 0.7)
  out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(out))
  p32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  ref = jax.grad(pairwise_penalty)(p32, 0.7)
  got = np.asarray(out["a"], np.float32) - np.asarray(grads["a"], np.float32)
  np.testing.assert_allclose(got, ref["a"], rtol=3e-2, atol=3e-2)


# ----------------------------------------------------------------------------
# hard_tie: the aggregate, by hand.


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_hard_tie_aggregate(reduce):
  grads = three_way_params(10)
  tx = ss.hard_tie(THREE_WAY, reduce=reduce)
  out, _ = jax.jit(tx.update)(grads, tx.init(ss.sync(three_way_params(0), THREE_WAY)))
  g = {k: np.asarray(v, np.float64) for k, v in grads.items() if k != "c"}
  g["c"] = np.asarray(grads["c"]["w"], np.float64)
  agg = g["a"] + g["b"].T + g["c"]
  sym = g["k"] + g["k"].T  # A leaf tied to its transpose: symmetric by construction.
  pair = g["s"] + g["t"].T
  if reduce == "mean":
    agg, sym, pair = agg / 3, sym / 2, pair / 2
  np.testing.assert_allclose(out["a"], agg, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["b"], agg.T, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["c"]["w"], agg, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["k"], sym, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["s"], pair, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["t"], pair.T, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out["free"], grads["free"])


def test_hard_tie_symmetric_group_with_a_third_member():
  """[k, kᵀ, a]: the aggregate is projected on symmetric matrices, so all stay equal."""
  grads = {"k": rand(0, (3, 3)), "a": rand(1, (3, 3))}
  out, _ = ss.hard_tie([["k", T("k"), "a"]]).update(grads, ss.HardTieState())
  k, a = np.asarray(grads["k"], np.float64), np.asarray(grads["a"], np.float64)
  expected = k + k.T + (a + a.T) / 2
  np.testing.assert_allclose(out["k"], expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["a"], expected, rtol=1e-6, atol=1e-6)


def test_hard_tie_none_updates_do_not_count():
  grads = {"a": jnp.array([1.0, 2.0]), "b": None, "c": jnp.array([10.0, 20.0])}
  for reduce, expected in (("sum", [11.0, 22.0]), ("mean", [5.5, 11.0])):
    tx = ss.hard_tie([["a", "b", "c"]], reduce=reduce)
    state = tx.init({"a": jnp.zeros(2), "b": None, "c": jnp.zeros(2)})
    for update in (tx.update, jax.jit(tx.update)):
      out, _ = update(grads, state)
      assert out["b"] is None
      np.testing.assert_allclose(out["a"], expected)
      np.testing.assert_allclose(out["c"], expected)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_hard_tie_keeps_members_equal_under_adam(reduce):
  """Random, unrelated gradients per member; after sync the members stay bitwise equal."""
  params = ss.sync(three_way_params(0), THREE_WAY)
  tx = optax.chain(ss.hard_tie(THREE_WAY, reduce=reduce), optax.adamw(0.05, weight_decay=0.1))
  state = tx.init(params)
  step = jax.jit(tx.update)
  for i in range(5):
    updates, state = step(three_way_params(100 + 10 * i), state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params["a"], params["b"].T)
  np.testing.assert_array_equal(params["a"], params["c"]["w"])
  np.testing.assert_array_equal(params["k"], params["k"].T)
  np.testing.assert_array_equal(params["s"], params["t"].T)
  start = ss.sync(three_way_params(0), THREE_WAY)
  assert np.abs(np.asarray(params["a"] - start["a"])).min() > 1e-3  # They did move.


def test_hard_tie_bf16_keeps_dtype():
  grads = {"a": rand(0, (2, 3), dtype=jnp.bfloat16), "b": rand(1, (3, 2), dtype=jnp.bfloat16)}
  out, _ = jax.jit(ss.hard_tie([["a", T("b")]]).update)(grads, ss.HardTieState())
  assert out["a"].dtype == out["b"].dtype == jnp.bfloat16
  ref = np.asarray(grads["a"], np.float32) + np.asarray(grads["b"], np.float32).T
  np.testing.assert_allclose(np.asarray(out["a"], np.float32), ref, rtol=1e-2, atol=1e-2)
  np.testing.assert_array_equal(out["a"], out["b"].T)


# ----------------------------------------------------------------------------
# sync.


def test_sync_copies_the_first_member():
  params = three_way_params(0)
  synced = ss.sync(params, THREE_WAY)
  np.testing.assert_array_equal(synced["a"], params["a"])  # The first member is kept.
  np.testing.assert_array_equal(synced["b"], np.asarray(params["a"]).T)
  np.testing.assert_array_equal(synced["c"]["w"], params["a"])
  k = np.asarray(params["k"])
  np.testing.assert_allclose(synced["k"], (k + k.T) / 2, rtol=1e-6)  # Tied to itself: symmetrized.
  np.testing.assert_array_equal(synced["t"], np.asarray(params["s"]).T)
  np.testing.assert_array_equal(synced["free"], params["free"])
  assert not np.allclose(params["b"], np.asarray(params["a"]).T)  # A new tree; the input is unchanged.


def test_sync_first_member_transposed_and_dtype():
  params = {"enc": rand(0, (2, 3)), "dec": jnp.zeros((2, 3), jnp.bfloat16)}
  synced = ss.sync(params, [[T("enc"), T("dec")]])
  assert synced["dec"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(synced["dec"], params["enc"].astype(jnp.bfloat16))


def test_sync_on_nnx_state_and_linen_params():
  model = AutoencoderNNX(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  for groups in (GROUPS, [["enc/kernel/value", T("dec/kernel/value")]]):
    synced = ss.sync(state, groups)
    assert isinstance(synced, nnx.State)
    np.testing.assert_array_equal(synced["dec"]["kernel"][...], np.asarray(synced["enc"]["kernel"][...]).T)
  assert not np.allclose(model.dec.kernel[...], np.asarray(model.enc.kernel[...]).T)
  nnx.update(model, ss.sync(state, GROUPS))
  np.testing.assert_array_equal(model.dec.kernel[...], np.asarray(model.enc.kernel[...]).T)

  linen = AutoencoderLinen().init(jax.random.key(0), jnp.zeros((1, IN)))["params"]
  synced = ss.sync(linen, GROUPS)
  np.testing.assert_array_equal(synced["dec"]["kernel"], np.asarray(linen["enc"]["kernel"]).T)
  np.testing.assert_array_equal(synced["dec"]["bias"], linen["dec"]["bias"])


# ----------------------------------------------------------------------------
# A tied autoencoder: dict, Linen and NNX trees against one shared W.

IN, HIDDEN, STEPS = 6, 4, 6
GROUPS = [["enc/kernel", T("dec/kernel")]]


def data(seed=0):
  return rand(seed, (32, IN))


def shared_start(seed=0):
  return {"W": rand(seed, (IN, HIDDEN), 0.5), "b1": rand(seed + 1, (HIDDEN,), 0.1), "b2": rand(seed + 2, (IN,), 0.1)}


def shared_loss(p, x):
  """The reference: ONE matrix W, used by the encoder and (transposed) by the decoder."""
  h = jnp.tanh(x @ p["W"] + p["b1"])
  return jnp.mean((h @ p["W"].T + p["b2"] - x) ** 2)


def tied_loss(p, x):
  h = jnp.tanh(x @ p["enc"]["kernel"] + p["enc"]["bias"])
  return jnp.mean((h @ p["dec"]["kernel"] + p["dec"]["bias"] - x) ** 2)


class AutoencoderLinen(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(HIDDEN, name="enc")(x))
    return nn.Dense(IN, name="dec")(h)


class AutoencoderNNX(nnx.Module):
  def __init__(self, rngs):
    self.enc = nnx.Linear(IN, HIDDEN, rngs=rngs)
    self.dec = nnx.Linear(HIDDEN, IN, rngs=rngs)

  def __call__(self, x):
    return self.dec(jnp.tanh(self.enc(x)))


def untied_start(seed=0):
  """The shared start, except that the decoder's kernel is unrelated (sync fixes it)."""
  s = shared_start(seed)
  return {"enc": {"kernel": s["W"], "bias": s["b1"]},
          "dec": {"kernel": rand(seed + 50, (HIDDEN, IN)), "bias": s["b2"]}}


def train_tied(kind, tx, x, start, steps=STEPS):
  """Trains the tied autoencoder written as ``kind``; returns the params after each step (dicts)."""
  history = []
  if kind == "nnx":
    model = AutoencoderNNX(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    for layer in ("enc", "dec"):
      for name in ("kernel", "bias"):
        state[layer][name].set_value(start[layer][name])
    nnx.update(model, state)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x):
      grads = nnx.grad(lambda m: jnp.mean((m(x) - x) ** 2))(model)
      opt.update(model, grads)

    for _ in range(steps):
      step(model, opt, x)
      layers = {"enc": model.enc, "dec": model.dec}
      history.append({k: {"kernel": np.asarray(v.kernel[...]), "bias": np.asarray(v.bias[...])}
                      for k, v in layers.items()})
    return history

  if kind == "linen":
    module = AutoencoderLinen()
    loss = lambda p, x: jnp.mean((module.apply({"params": p}, x) - x) ** 2)
  else:
    loss = tied_loss
  params = start
  state = tx.init(params)

  @jax.jit
  def step(params, state, x):
    updates, state = tx.update(jax.grad(loss)(params, x), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state, x)
    history.append(jax.tree.map(np.asarray, params))
  return history


KINDS = ["dict", "linen", "nnx"]


@pytest.mark.parametrize("kind", KINDS)
def test_hard_tied_autoencoder_matches_one_shared_matrix(kind):
  x = data()
  start = ss.sync(untied_start(), GROUPS)
  tx = optax.chain(ss.hard_tie(GROUPS), optax.adam(0.05))
  history = train_tied(kind, tx, x, start)

  ref_tx = optax.adam(0.05)
  p = shared_start()
  s = ref_tx.init(p)
  for got in history:
    updates, s = ref_tx.update(jax.grad(shared_loss)(p, x), s, p)
    p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(got["enc"]["kernel"], p["W"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["dec"]["kernel"], p["W"].T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["enc"]["bias"], p["b1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["dec"]["bias"], p["b2"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["enc"]["kernel"], got["dec"]["kernel"].T)
  assert np.abs(history[-1]["enc"]["kernel"] - np.asarray(shared_start()["W"])).max() > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_soft_tied_autoencoder_matches_penalized_loss(kind):
  """soft_tie before Adam is Adam on loss + λ/4 ‖W_enc − W_decᵀ‖² (jax.grad of it)."""
  x, lam = data(), 0.3
  start = untied_start()  # Not synced: the penalty has work to do.
  history = train_tied(kind, optax.chain(ss.soft_tie(GROUPS, lam), optax.adam(0.05)), x, start)

  def penalized(p, x):
    return tied_loss(p, x) + lam / 4 * jnp.sum((p["enc"]["kernel"] - p["dec"]["kernel"].T) ** 2)

  ref_tx = optax.adam(0.05)
  p = start
  s = ref_tx.init(p)
  for got in history:
    updates, s = ref_tx.update(jax.grad(penalized)(p, x), s, p)
    p = optax.apply_updates(p, updates)
    for layer in ("enc", "dec"):
      for name in ("kernel", "bias"):
        np.testing.assert_allclose(got[layer][name], p[layer][name], rtol=1e-5, atol=1e-5)


def test_soft_tie_with_large_strength_approaches_hard_tie():
  """Under SGD, soft tying with a growing λ tends to the hard tie (mean of the members' gradients)."""
  x, lr, steps = data(), 0.01, 100
  start = ss.sync(untied_start(), GROUPS)

  def run(tx):
    params, state = start, tx.init(start)

    def body(carry, _):
      params, state = carry
      updates, state = tx.update(jax.grad(tied_loss)(params, x), state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))((params, state))
    return params

  hard = run(optax.chain(ss.hard_tie(GROUPS, reduce="mean"), optax.sgd(lr)))
  moved = float(jnp.abs(hard["enc"]["kernel"] - start["enc"]["kernel"]).max())
  errors, gaps = [], []
  for lam in (0.0, 1.0, 10.0, 100.0):  # lr·λ up to 1 (stable below 2).
    soft = run(optax.chain(ss.soft_tie(GROUPS, lam), optax.sgd(lr)))
    errors.append(max(float(jnp.abs(soft[l]["kernel"] - hard[l]["kernel"]).max()) for l in ("enc", "dec")))
    gaps.append(float(jnp.abs(soft["enc"]["kernel"] - soft["dec"]["kernel"].T).max()))
  assert moved > 0.03
  assert errors == sorted(errors, reverse=True) and gaps == sorted(gaps, reverse=True), (errors, gaps)
  assert errors[-1] < 0.05 * errors[0], errors
  assert gaps[-1] < 0.05 * gaps[0], gaps


# ----------------------------------------------------------------------------
# Paths and errors.


def test_nnx_paths_with_or_without_value():
  model = AutoencoderNNX(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  for groups in (GROUPS, [["enc/kernel/value", T("dec/kernel/value")]]):
    out, _ = ss.hard_tie(groups).update(state, ss.HardTieState())
    np.testing.assert_array_equal(out["enc"]["kernel"][...], np.asarray(out["dec"]["kernel"][...]).T)


def test_list_paths():
  params = {"layers": [{"w": rand(0, (2, 2))}, {"w": rand(1, (2, 2))}]}
  out, _ = ss.hard_tie([["layers/0/w", "layers/1/w"]]).update(params, ss.HardTieState())
  np.testing.assert_allclose(out["layers"][0]["w"], params["layers"][0]["w"] + params["layers"][1]["w"])


def test_error_no_leaf_at_path():
  params = {"enc": {"kernel": jnp.ones((2, 3))}, "dec": {"kernel": jnp.ones((3, 2))}}
  for tx in (ss.soft_tie([["enc/kernel", "dec/kernal"]], 1.0), ss.hard_tie([["enc/kernel", "dec/kernal"]])):
    with pytest.raises(ValueError, match=r"no leaf at path 'dec/kernal'; paths are: .*'dec/kernel'"):
      tx.init(params)
  state = ss.hard_tie(GROUPS).init(params)
  with pytest.raises(ValueError, match="hard_tie: no update at path 'enc/kernel'"):
    ss.hard_tie(GROUPS).update({"dec": {"kernel": jnp.ones((3, 2))}}, state)
  with pytest.raises(ValueError, match="sync: no leaf at path 'x'"):
    ss.sync(params, [["x", "enc/kernel"]])


def test_error_incompatible_shapes():
  params = {"enc": {"kernel": jnp.ones((2, 3))}, "dec": {"kernel": jnp.ones((3, 2))}}
  with pytest.raises(ValueError, match=r"soft_tie: members of group 0 have incompatible shapes: "
                                       r"'enc/kernel' \(2, 3\), 'dec/kernel' \(3, 2\)"):
    ss.soft_tie([["enc/kernel", "dec/kernel"]], 1.0).init(params)
  with pytest.raises(ValueError, match="hard_tie: members of group 0 have incompatible shapes"):
    ss.hard_tie([["enc/kernel", T("enc/kernel")]]).init(params)
  with pytest.raises(ValueError, match="sync: members of group 0 have incompatible shapes"):
    ss.sync(params, [["enc/kernel", "dec/kernel"]])


def test_error_leaf_in_two_groups_and_malformed_groups():
  with pytest.raises(ValueError, match=r"soft_tie: the leaf at path 'b' is in two groups \(0 and 1\)"):
    ss.soft_tie([["a", "b"], [T("b"), "c"]], 1.0)
  with pytest.raises(ValueError, match="hard_tie: member 'a' appears twice in group 0"):
    ss.hard_tie([["a", "a"]])
  with pytest.raises(ValueError, match="wrap the group in a list"):
    ss.hard_tie(["a", "b"])
  with pytest.raises(ValueError, match="group 0 has 1 member"):
    ss.hard_tie([["a"]])
  with pytest.raises(ValueError, match="a member must be a non-empty path string"):
    ss.hard_tie([["a", 3]])
  with pytest.raises(ValueError, match="transposed: path must be a non-empty string"):
    T("")


def test_error_arguments():
  params = {"a": jnp.ones(2), "b": jnp.ones(2), "i": jnp.ones(2, jnp.int32)}
  tx = ss.soft_tie([["a", "b"]], 1.0)
  with pytest.raises(ValueError, match="soft_tie needs params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="strength must be finite and >= 0"):
    ss.soft_tie([["a", "b"]], -1.0)
  with pytest.raises(ValueError, match="reduce must be one of"):
    ss.hard_tie([["a", "b"]], reduce="max")
  with pytest.raises(ValueError, match="the leaf at path 'i' must be a floating-point array"):
    ss.hard_tie([["a", "i"]]).init(params)


# ----------------------------------------------------------------------------
# hard_tie's init: members must start equal (as ss.sync leaves them).


def test_hard_tie_init_rejects_members_that_do_not_start_equal():
  params = three_way_params(0)
  tx = ss.hard_tie(THREE_WAY)
  with pytest.raises(ValueError, match=r"hard_tie: the members of group 0 do not start equal: "
                                       r"transposed\('b'\) differs from 'a' at 15 of 15 entries .*"
                                       r"call params = ss\.sync\(params, groups\)"):
    tx.init(params)
  # The first member that differs is named: here the third (b already equals a).
  synced_ab = dict(params, b=params["a"].T)
  with pytest.raises(ValueError, match=r"group 0 do not start equal: 'c/w' differs from 'a'"):
    tx.init(synced_ab)
  # A leaf tied to its own transpose must be symmetric; the message names that group.
  fixed = ss.sync(params, [THREE_WAY[0]])
  with pytest.raises(ValueError, match=r"group 1 do not start equal: transposed\('k'\) differs from 'k' "
                                       r"at 12 of 16 entries"):
    tx.init(fixed)
  tx.init(ss.sync(params, THREE_WAY))  # Synced: no error.


def test_hard_tie_init_compares_exactly():
  a = rand(0, (3, 4))
  tx = ss.hard_tie([["a", T("b")]])
  one_ulp = a.T.at[2, 1].set(jnp.nextafter(a.T[2, 1], jnp.inf))
  with pytest.raises(ValueError, match=r"differs from 'a' at 1 of 12 entries"):
    tx.init({"a": a, "b": one_ulp})
  # NumPy float64 leaves are compared in float64 (1e-12 apart is not equal).
  x = np.array([[1.0, 2.0]])
  with pytest.raises(ValueError, match="at 1 of 2 entries"):
    ss.hard_tie([["x", "y"]]).init({"x": x, "y": x + np.array([[0.0, 1e-12]])})
  # A narrower member holds the first member rounded to its dtype, as sync writes it.
  params = ss.sync({"a": a, "b": jnp.zeros((4, 3), jnp.bfloat16)}, [["a", T("b")]])
  tx.init(params)
  # NaNs at the same places are equal.
  nan = a.at[0, 0].set(jnp.nan)
  tx.init({"a": nan, "b": nan.T})


def test_hard_tie_init_check_skips_unknown_values_and_none():
  params = three_way_params(0)  # Not synced, but the values are not known here:
  tx = ss.hard_tie(THREE_WAY)
  jax.eval_shape(tx.init, params)
  jax.jit(tx.init)(params)
  tx.init(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  # A None member is left out; the others must still be equal.
  two = {"a": jnp.ones(2), "b": None, "c": jnp.ones(2)}
  ss.hard_tie([["a", "b", "c"]]).init(two)
  with pytest.raises(ValueError, match="'c' differs from 'a'"):
    ss.hard_tie([["a", "b", "c"]]).init(dict(two, c=jnp.zeros(2)))
