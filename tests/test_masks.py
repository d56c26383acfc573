"""Masks as ``optax.masked`` takes them, in every transform and quantizer.

The reference for what a mask selects is ``optax.masked`` itself: a masked
``set_to_zero`` zeroes exactly the selected leaves.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softshare_jax as ss
from softshare_jax import masks


def make_params():
  rng = np.random.default_rng(0)
  f = lambda *shape: jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32)
  return {"enc": {"kernel": f(6, 5), "bias": f(5)}, "dec": {"kernel": f(5, 6), "bias": f(6)}, "head": f(4, 3)}


def optax_selects(mask, params):
  """What optax.masked selects: the leaves a masked set_to_zero zeroes."""
  ones = jax.tree.map(jnp.ones_like, params)
  tx = optax.masked(optax.set_to_zero(), mask)
  out, _ = tx.update(ones, tx.init(params), params)
  return jax.tree.map(lambda x: bool(np.all(np.asarray(x) == 0)), out)


PREFIX_MASKS = [
    True,
    False,
    {"enc": True, "dec": False, "head": True},
    {"enc": {"kernel": True, "bias": False}, "dec": True, "head": False},
    {"enc": np.bool_(True), "dec": jnp.array(False), "head": np.array(True)},
    lambda p: {"enc": True, "dec": {"kernel": p["dec"]["kernel"].ndim == 2, "bias": False}, "head": False},
]


@pytest.mark.parametrize("mask", PREFIX_MASKS)
def test_resolve_mask_is_optax_masked(mask):
  params = make_params()
  assert masks.resolve_mask(mask, params, masks.is_kernel_leaf) == optax_selects(mask, params)


def test_default_mask_per_leaf():
  params = {**make_params(), "step": jnp.zeros((2, 2), jnp.int32)}
  got = masks.resolve_mask(None, params, masks.is_kernel_leaf)
  assert got == {"enc": {"kernel": True, "bias": False}, "dec": {"kernel": True, "bias": False},
                 "head": True, "step": False}


@pytest.mark.parametrize(
    "mask, match",
    [
        ({"enc": "False", "dec": False, "head": False}, "mask must hold bools.*'False'.*'enc'"),
        ({"enc": 1, "dec": False, "head": False}, "mask must hold bools.*1 at 'enc'"),
        ({"enc": 0.0, "dec": False, "head": False}, "mask must hold bools"),
        ({"enc": np.array([True, False]), "dec": False, "head": False}, "mask must hold bools"),
        ({"enc": True, "dec": False, "head": {"w": True}}, "mask must be a pytree of bools.*prefix"),
        ({"enc": True, "dec": False}, "mask must be a pytree of bools"),
        ({"enc": True, "dec": False, "head": False, "extra": True}, "mask must be a pytree of bools"),
    ],
)
def test_resolve_mask_rejects_non_bool_leaves_and_bad_structures(mask, match):
  with pytest.raises(ValueError, match=match):
    masks.resolve_mask(mask, make_params(), masks.is_kernel_leaf)


def test_traced_mask_is_rejected():
  tx = ss.weight_sharing_prox(0.1, 0.1, mask=lambda p: jax.tree.map(lambda x: jnp.all(x > -1e9), p))
  params = make_params()
  with pytest.raises(ValueError, match="mask must hold bools"):
    jax.jit(tx.update)(params, tx.init(params), params)


def test_transforms_take_prefix_masks():
  rng = np.random.default_rng(1)
  params = {"enc": {"kernel": jnp.asarray(rng.normal(0, 0.3, (4, 3)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(0, 0.3, (4, 3)), jnp.float32)},
            "dec": jnp.asarray(rng.normal(0, 0.3, (4, 3)), jnp.float32)}
  grads = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), params)
  # What each leaf's update is, given what it selects, is the transforms' own
  # tests; here: the prefix reaches the right leaves.
  for tx in (ss.mixture_prior(2, 1e-2, mask={"enc": True, "dec": False}),
             ss.weight_sharing_prox(0.5, 0.1, mask={"enc": True, "dec": False}, method="host")):
    out, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(out["dec"]), np.asarray(grads["dec"]))
    for k in ("kernel", "bias"):
      assert not np.array_equal(np.asarray(out["enc"][k]), np.asarray(grads["enc"][k]))


def test_quantizers_and_stats_take_prefix_masks():
  params = make_params()
  m = ss.Mixture(jnp.array([-0.3, 0.3]), jnp.full(3, 4.0), jnp.zeros(2), jnp.array(0.0), True)
  quantized = lambda q: {p for p, x in q.leaves_with_paths() if isinstance(x, ss.QuantizedLeaf)}
  q = ss.quantize(params, m, mask={"enc": True, "dec": False, "head": False})
  assert quantized(q) == {"enc/bias", "enc/kernel"}
  q = ss.cluster_weights(params, 4, mask={"enc": False, "dec": True, "head": False}, init="linear")
  assert quantized(q) == {"dec/bias", "dec/kernel"}
  q = ss.hash_clusters(params, 4, key=jax.random.key(0), mask={"enc": False, "dec": False, "head": True})
  assert quantized(q) == {"head"}
  assert set(ss.sharing_stats(params, mask={"enc": True, "dec": False, "head": False}).leaves) == {
      "enc/kernel", "enc/bias"}


NON_FLOAT = {"int": jnp.ones((3, 2), jnp.int32), "bool": jnp.ones((3, 2), bool),
             "complex": jnp.ones((3, 2), jnp.complex64)}


@pytest.mark.parametrize("kind", sorted(NON_FLOAT))
def test_a_mask_selecting_a_non_float_leaf_is_an_error_everywhere(kind):
  params = {"w": jnp.ones((3, 2)), "layers": [{"x": NON_FLOAT[kind]}]}
  mask = {"w": True, "layers": True}
  match = "mask selects params leaf 'layers/0/x', which is not a floating-point array"
  m = ss.Mixture(jnp.array([1.0]), jnp.zeros(2), jnp.zeros(1), jnp.array(0.0), True)
  calls = {
      "mixture_prior": lambda: ss.mixture_prior(2, mask=mask).init(params),
      "weight_sharing_prox": lambda: ss.weight_sharing_prox(0.1, 0.1, mask=mask).update(
          params, ss.WeightSharingProxState(jnp.zeros([], jnp.int32)), params),
      "quantize": lambda: ss.quantize(params, m, mask=mask),
      "cluster_weights": lambda: ss.cluster_weights(params, 2, mask=mask, init="linear"),
      "hash_clusters": lambda: ss.hash_clusters(params, 2, key=jax.random.key(0), mask=mask),
      "sharing_stats": lambda: ss.sharing_stats(params, mask=mask),
  }
  for name, call in calls.items():
    with pytest.raises(ValueError, match=match):
      call()
      pytest.fail(f"{name} accepted a mask selecting a {kind} leaf")


def test_mixture_prior_update_rejects_a_non_float_leaf_too():
  # The mask is resolved again at each update: a params tree that gained an
  # int leaf under a True prefix is caught there, not truncated.
  tx = ss.mixture_prior(2, 1e-2, mask=True)
  state = tx.init({"w": jnp.ones((3, 2))})
  params = {"w": jnp.ones((3, 2)), "n": jnp.ones((2, 2), jnp.int32)}
  with pytest.raises(ValueError, match="'n', which is not a floating-point"):
    tx.update(params, state, params)


def test_defaults_still_skip_non_float_leaves():
  params = {"w": jnp.ones((3, 2)), "n": jnp.ones((2, 2), jnp.int32)}
  grads = {"w": jnp.full((3, 2), 0.1), "n": jnp.ones((2, 2), jnp.int32)}
  for tx in (ss.mixture_prior(2, 1e-2), ss.weight_sharing_prox(0.1, 0.1)):
    out, _ = tx.update(grads, tx.init(params), params)
    assert out["n"] is grads["n"] or np.array_equal(np.asarray(out["n"]), np.asarray(grads["n"]))
