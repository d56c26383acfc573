"""Flax NNX: every public function that takes a params tree takes an ``nnx.State``.

Each test runs the same call on ``nnx.state(model, nnx.Param)`` (paths end in
the Variables' ``value``) and on ``nnx.to_pure_dict`` of it (plain dicts, the
independent route) and compares the results; transforms run inside
``nnx.Optimizer``, which hands them pure updates.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import softshare_jax as ss
from softshare_jax import masks

X = jax.random.normal(jax.random.key(1), (6, 4, 4, 1))
Y = jax.random.normal(jax.random.key(2), (6, 3))
PATHS = ["conv/bias", "conv/kernel", "fc/bias", "fc/kernel"]


class CNN(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(4 * 16, 3, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.conv(x))
    return self.fc(h.reshape(h.shape[0], -1))


def loss(model):
  return jnp.mean((model(X) - Y) ** 2)


def fresh(seed=0):
  """A model, its params state and a pure-dict copy (nnx.state shares the model's Variables)."""
  model = CNN(nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  return model, state, jax.tree.map(jnp.array, nnx.to_pure_dict(state))


def params_of(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_same_quantized(q_state, q_pure):
  """Same leaves under the same canonical paths; the NNX one keeps the State's structure."""
  assert isinstance(q_state.tree, nnx.State)
  got, want = q_state.leaves_with_paths(), q_pure.leaves_with_paths()
  assert [p for p, _ in got] == [p for p, _ in want] == PATHS
  for (path, a), (_, b) in zip(got, want):
    assert type(a) is type(b), path
    assert_trees_equal(a, b)
    if isinstance(a, ss.QuantizedLeaf):
      assert (a.shape, a.dtype, a.bits, a.hash_seed) == (b.shape, b.dtype, b.bits, b.hash_seed)


def kernels(state):
  return jnp.concatenate([v.ravel() for p, v in masks.leaves_with_paths(state) if p.endswith("kernel")])


QUANTIZERS = {
    "quantize-mixture": lambda t, w: ss.quantize(t, ss.init_mixture(w, 4, zero_weight=0.5)),
    "quantize-None": lambda t, w: ss.quantize(t, None),
    "cluster_weights": lambda t, w: ss.cluster_weights(t, 4, key=jax.random.key(0), prune_fraction=0.5),
    "hash_clusters": lambda t, w: ss.hash_clusters(t, 8, key=jax.random.key(0)),
}


def quantized_pair(name):
  model, state, pure = fresh()
  w = kernels(pure)
  return model, QUANTIZERS[name](state, w), QUANTIZERS[name](pure, w)


# ----------------------------------------------------------------------------
# Paths.


def recording(seen):
  """A transform that records the canonical paths of what it is given."""

  def init_fn(params):
    seen["init"] = [p for p, _ in masks.leaves_with_paths(params)]
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    seen["update"] = [p for p, _ in masks.leaves_with_paths(updates)]
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def test_state_pure_dict_and_optimizer_updates_name_leaves_alike():
  model, state, pure = fresh()
  seen = {}
  opt = nnx.Optimizer(model, recording(seen), wrt=nnx.Param)
  opt.update(model, nnx.grad(loss)(model))
  assert jax.tree_util.tree_flatten_with_path(state)[0][0][0][-1] == jax.tree_util.GetAttrKey("value")
  for tree in (state, pure, nnx.as_pure(state)):
    assert [p for p, _ in masks.leaves_with_paths(tree)] == PATHS
  assert seen == {"init": PATHS, "update": PATHS}
  # Only an attribute key named value is a Variable's: a dict key "value" stays.
  assert [p for p, _ in masks.leaves_with_paths({"a": {"value": 1}})] == ["a/value"]


# ----------------------------------------------------------------------------
# Quantizers, dequantize, report.


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_quantizers_on_state_match_pure_dict(name):
  model, q_state, q_pure = quantized_pair(name)
  assert_same_quantized(q_state, q_pure)
  params = ss.dequantize(q_state)
  assert isinstance(params, nnx.State)
  nnx.update(model, params)
  assert_trees_equal(params_of(model), ss.dequantize(q_pure))


@pytest.mark.parametrize("name", ["quantize-mixture", "cluster_weights", "hash_clusters"])
def test_compression_report_on_state_matches_pure_dict(name):
  _, q_state, q_pure = quantized_pair(name)
  got, want = ss.compression_report(q_state), ss.compression_report(q_pure)
  assert [r.path for r in got.leaves] == PATHS
  assert got == want


# ----------------------------------------------------------------------------
# Files.


def test_file_saved_from_state_is_the_pure_dict_file(tmp_path):
  _, q_state, q_pure = quantized_pair("cluster_weights")
  ss.save_quantized(tmp_path / "state.st", q_state)
  ss.save_quantized(tmp_path / "pure.st", q_pure)
  assert (tmp_path / "state.st").read_bytes() == (tmp_path / "pure.st").read_bytes()


@pytest.mark.parametrize("saved", ["state", "pure"])
@pytest.mark.parametrize("like", ["state", "pure", "as_pure", "quantized-state", "quantized-pure"])
def test_load_quantized_like_state_or_pure_dict(tmp_path, saved, like):
  model, q_state, q_pure = quantized_pair("cluster_weights")
  path = os.fspath(tmp_path / "model.st")
  ss.save_quantized(path, q_state if saved == "state" else q_pure)
  _, state, pure = fresh(seed=5)  # another model of the same architecture
  template = {"state": state, "pure": pure, "as_pure": nnx.as_pure(state),
              "quantized-state": q_state, "quantized-pure": q_pure}[like]
  loaded = ss.load_quantized(path, like=template)
  want_type = type(template.tree if isinstance(template, ss.Quantized) else template)
  assert type(loaded.tree) is want_type
  assert_same_quantized(ss.load_quantized(path, like=state), q_pure)
  nnx.update(model, ss.dequantize(loaded))
  assert_trees_equal(params_of(model), ss.dequantize(q_pure))


def test_load_quantized_without_like_updates_a_model(tmp_path):
  model, q_state, q_pure = quantized_pair("quantize-mixture")
  ss.save_quantized(tmp_path / "m.st", q_state)
  nnx.update(model, ss.dequantize(ss.load_quantized(tmp_path / "m.st")))
  assert_trees_equal(params_of(model), ss.dequantize(q_pure))


def test_load_quantized_reads_files_that_kept_the_value_key(tmp_path):
  # Files written before paths were canonical stored an nnx.State's "value".
  _, _, q_pure = quantized_pair("cluster_weights")
  old = ss.Quantized({layer: {name: {"value": leaf} for name, leaf in leaves.items()}
                      for layer, leaves in q_pure.tree.items()})
  ss.save_quantized(tmp_path / "old.st", old)
  _, state, _ = fresh()
  assert_same_quantized(ss.load_quantized(tmp_path / "old.st", like=state), q_pure)


def test_load_quantized_like_another_architecture_is_an_error(tmp_path):
  _, q_state, _ = quantized_pair("cluster_weights")
  ss.save_quantized(tmp_path / "m.st", q_state)
  other = nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Param)
  with pytest.raises(ValueError, match="like: its leaves' paths"):
    ss.load_quantized(tmp_path / "m.st", like=other)


# ----------------------------------------------------------------------------
# Transforms inside nnx.Optimizer, against the same chain on pure dicts.


def run_both(tx, model, pure, steps=3):
  """Steps of ``nnx.Optimizer`` and of ``tx`` on the pure dict; the two params and states."""
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  state = tx.init(pure)
  for _ in range(steps):
    grads = nnx.grad(loss)(model)
    updates, state = tx.update(jax.tree.map(jnp.asarray, nnx.to_pure_dict(grads)), state, pure)
    pure = optax.apply_updates(pure, updates)
    opt.update(model, grads)
  return params_of(model), pure, opt, state


@pytest.mark.parametrize("source", ["state", "pure"])
def test_keep_clusters_in_nnx_optimizer(source):
  model, q_state, q_pure = quantized_pair("cluster_weights")
  q = q_state if source == "state" else q_pure
  start = ss.dequantize(q_pure)
  nnx.update(model, ss.dequantize(q))
  got, want, _, _ = run_both(optax.chain(ss.keep_clusters(q), optax.adam(1e-2)), model, start)
  assert_trees_equal(got, want)
  for path, leaf in q_pure.leaves_with_paths():
    layer, name = path.split("/")
    before, after = np.asarray(start[layer][name]), got[layer][name]
    if not isinstance(leaf, ss.QuantizedLeaf):
      assert not np.array_equal(before, after)  # kept leaves train freely
      continue
    idx = np.asarray(leaf.unpacked()).reshape(leaf.shape)
    assert np.unique(after).size <= leaf.codebook.size
    assert np.all(after[before == 0] == 0)
    for c in range(leaf.codebook.size):  # one value per cluster
      assert np.unique(after[idx == c]).size == 1
    assert not np.array_equal(before, after)


def test_keep_clusters_refuses_a_state_that_lost_its_cluster_ids():
  # A state whose cluster ids were dropped or reshaped (hand-made, or a bad restore):
  # passing the updates through unchanged would be a silent wrong answer.
  _, q_state, _ = quantized_pair("cluster_weights")
  params = ss.dequantize(q_state)
  tx = ss.keep_clusters(q_state)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, nnx.to_pure_dict(params))
  tx.update(grads, state)
  flat = {path: ids.reshape(-1) for path, ids in state.ids.items()}
  for bad in (state._replace(ids=flat), state._replace(ids={}), state._replace(ids=None)):
    with pytest.raises(ValueError, match="keep_clusters: its state must hold the quantized leaves"):
      tx.update(grads, bad)


def test_keep_clusters_refuses_two_leaves_with_one_path():
  q = ss.quantize({"a/b": jnp.ones((2, 2)), "a": {"b": jnp.zeros((2, 2))}}, None)
  with pytest.raises(ValueError, match="two of its leaves have the path 'a/b'"):
    ss.keep_clusters(q)


@pytest.mark.parametrize("make", [
    lambda: optax.chain(ss.mixture_prior(3, 1e-2), optax.adam(1e-2)),
    lambda: optax.chain(ss.mixture_prior(3, 1e-2, mixture_update="em"), optax.adam(1e-2)),
    lambda: optax.chain(optax.sgd(0.1), ss.weight_sharing_prox(1e-2, 0.1)),
], ids=["mixture_prior", "mixture_prior-em", "weight_sharing_prox"])
def test_transforms_in_nnx_optimizer_match_pure_dict(make):
  model, _, pure = fresh()
  got, want, _, _ = run_both(make(), model, pure)
  assert_trees_equal(got, want)
  assert not np.array_equal(got["fc"]["kernel"], pure["fc"]["kernel"])


def test_get_mixture_on_nnx_optimizer_state():
  model, _, pure = fresh()
  _, _, opt, state = run_both(optax.chain(ss.mixture_prior(3, 1e-2), optax.adam(1e-2)), model, pure)
  got, want = ss.get_mixture(opt.opt_state), ss.get_mixture(state)
  assert got.has_zero == want.has_zero
  for field in ("means", "precisions", "weights"):
    np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(want, field)))


def test_get_mixture_on_nnx_optimizer_state_holds_arrays():
  model = CNN(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.chain(ss.mixture_prior(3, 1e-2), optax.adam(1e-2)), wrt=nnx.Param)
  mixture = ss.get_mixture(opt.opt_state)
  assert all(isinstance(x, jax.Array) for x in (mixture.free_means, mixture.log_precisions, mixture.logits))


class AE(nnx.Module):

  def __init__(self, rngs):
    self.enc = nnx.Linear(3, 2, rngs=rngs)
    self.dec = nnx.Linear(2, 3, rngs=rngs)

  def __call__(self, x):
    return self.dec(jnp.tanh(self.enc(x)))


def ae_loss(model):
  return jnp.mean((model(Y) - Y) ** 2)


def tie(kind, suffix=""):
  groups = [["enc/kernel" + suffix, ss.transposed("dec/kernel" + suffix)]]
  tier = ss.soft_tie(groups, 0.5) if kind == "soft_tie" else ss.hard_tie(groups)
  return groups, optax.chain(tier, optax.sgd(0.1))


@pytest.mark.parametrize("kind", ["soft_tie", "hard_tie"])
@pytest.mark.parametrize("suffix", ["", "/value"])
def test_tying_in_nnx_optimizer_matches_pure_dict(kind, suffix):
  groups, tx = tie(kind, suffix)
  model = AE(nnx.Rngs(0))
  synced = ss.sync(nnx.state(model, nnx.Param), groups)
  assert isinstance(synced, nnx.State)
  nnx.update(model, synced)
  pure = jax.tree.map(jnp.asarray, params_of(model))
  np.testing.assert_array_equal(pure["enc"]["kernel"], pure["dec"]["kernel"].T)
  _, reference = tie(kind)  # the pure-dict route names members without "value"
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  state = reference.init(pure)
  for _ in range(3):
    grads = nnx.grad(ae_loss)(model)
    updates, state = reference.update(jax.tree.map(jnp.asarray, nnx.to_pure_dict(grads)), state, pure)
    pure = optax.apply_updates(pure, updates)
    opt.update(model, grads)
  got = params_of(model)
  assert_trees_equal(got, pure)
  if kind == "hard_tie":
    np.testing.assert_array_equal(got["enc"]["kernel"], got["dec"]["kernel"].T)
  else:
    assert not np.array_equal(got["enc"]["kernel"], got["dec"]["kernel"].T)


def test_sharing_stats_on_state_matches_pure_dict():
  model, q_state, _ = quantized_pair("cluster_weights")
  nnx.update(model, ss.dequantize(q_state))
  state = nnx.state(model, nnx.Param)
  got, want = ss.sharing_stats(state), ss.sharing_stats(nnx.to_pure_dict(state))
  assert list(got.leaves) == PATHS
  assert got == want
