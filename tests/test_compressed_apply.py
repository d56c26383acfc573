"""ss.compressed_apply: the dequantized model's outputs, with each weight decoded at its use.

Values are checked against ``apply_fn(ss.dequantize(q), ...)`` (bitwise: the
same operations in the same order) and, for the plain function, against
NumPy in float64; the memory bound against ``compiled.memory_analysis()``,
where the naive ``jit(lambda q, x: f(dequantize(q), x))`` fails it.
"""

from __future__ import annotations

import functools

import flax.linen as nn
from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

import softshare_jax as ss

GRID = np.linspace(-1.0, 1.0, 9)  # weights on a 9-value grid quantize losslessly with mixture=None


def grid_array(key: int, shape: tuple[int, ...]) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(key).choice(GRID, size=shape), jnp.float32)


def assert_same(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def jitted(f):
  return jax.jit(lambda q, *args: ss.compressed_apply(f, q, *args))


def naive(f):
  return jax.jit(lambda q, *args: f(ss.dequantize(q), *args))


# ----------------------------------------------------------------------------
# A plain function: every way of using a weight.


def plain_params():
  return {"a": grid_array(0, (6, 8)), "b": grid_array(1, (8, 8)), "c": grid_array(2, (8, 8)),
          "d": grid_array(3, (8, 5)), "e": grid_array(4, (5, 8)), "bias": grid_array(5, (8,)),
          "scale": jnp.asarray(np.random.default_rng(6).normal(size=8), jnp.float32)}


PLAIN_MASK = {"a": True, "b": True, "c": True, "d": True, "e": True, "bias": True, "scale": False}


def plain(p, x):
  h = x @ p["a"]                                    # @
  h = jnp.tanh(jnp.dot(h, p["b"]) + p["bias"])      # jnp.dot, a bias used elementwise
  h = lax.dot_general(h, p["c"], (((1,), (0,)), ((), ())))
  h = h * p["scale"]                                # a leaf that is not quantized
  h = jnp.einsum("bi,io->bo", h, p["d"])            # einsum
  h = jnp.matmul(h, p["e"])                         # matmul
  h = h + h @ p["b"].T                              # b used again, transposed
  return h.sum(axis=1), h


def plain_numpy(p, x):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  h = np.tanh(np.asarray(x, np.float64) @ p["a"] @ p["b"] + p["bias"])
  h = (h @ p["c"]) * p["scale"] @ p["d"]
  h = h @ p["e"]
  h = h + h @ p["b"].T
  return h.sum(axis=1), h


@pytest.fixture(scope="module")
def plain_case():
  params = plain_params()
  q = ss.quantize(params, None, mask=PLAIN_MASK)
  assert sorted(k for k, v in q.tree.items() if isinstance(v, ss.QuantizedLeaf)) == sorted(
      k for k, m in PLAIN_MASK.items() if m)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(3, 6)), jnp.float32)
  return params, q, x


def test_plain_function_equals_dequantized_model_under_jit(plain_case):
  params, q, x = plain_case
  got = jitted(plain)(q, x)
  assert_same(got, naive(plain)(q, x))
  for a, b in zip(got, plain_numpy(params, x)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5)


def test_plain_function_equals_dequantized_model_eagerly(plain_case):
  _, q, x = plain_case
  assert_same(ss.compressed_apply(plain, q, x), plain(ss.dequantize(q), x))


def test_grad_wrt_inputs_equals_dequantized_model(plain_case):
  _, q, x = plain_case
  loss = lambda f: lambda x: jnp.sum(f(x)[1] ** 2)
  want = jax.grad(loss(lambda x: plain(ss.dequantize(q), x)))(x)
  assert_same(jax.grad(loss(lambda x: ss.compressed_apply(plain, q, x)))(x), want)
  # Under jit, both compiled: XLA fuses the backward passes differently, so to rounding.
  got = jax.jit(jax.grad(loss(lambda x: ss.compressed_apply(plain, q, x))))(x)
  np.testing.assert_allclose(got, jax.jit(jax.grad(loss(lambda x: plain(ss.dequantize(q), x))))(x), rtol=1e-6)


def test_grad_wrt_codebooks_equals_dequantized_model(plain_case):
  _, q, x = plain_case
  loss = lambda f: lambda q: jnp.sum(f(q, x)[1] ** 2)
  want = jax.jit(jax.grad(loss(lambda q, x: plain(ss.dequantize(q), x)), allow_int=True))(q)
  got = jax.jit(jax.grad(loss(lambda q, x: ss.compressed_apply(plain, q, x)), allow_int=True))(q)
  floats = [(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)) if a.dtype != jax.dtypes.float0]
  assert len(floats) == 7  # six codebooks and the scale
  for a, b in floats:
    # A codebook entry's gradient sums many terms of either sign: rounding relative to the largest.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_vmap_over_inputs(plain_case):
  _, q, x = plain_case
  xs = jnp.stack([x, 2 * x])
  got = jax.jit(jax.vmap(lambda x: ss.compressed_apply(plain, q, x)))(xs)
  assert_same(got, jax.vmap(lambda x: plain(ss.dequantize(q), x))(xs))


def test_static_kwargs_and_weight_outputs(plain_case):
  _, q, x = plain_case

  def f(p, x, *, train, mode="sum"):
    assert isinstance(train, bool) and mode == "max"  # Python values stay Python values
    return {"y": x @ p["a"], "w": p["a"].T * 2.0, "s": p["scale"]}

  got = jax.jit(lambda q, x: ss.compressed_apply(f, q, x, train=True, mode="max"))(q, x)
  assert_same(got, f(ss.dequantize(q), x, train=True, mode="max"))


# ----------------------------------------------------------------------------
# Calls, custom rules, control flow, convolutions.


def test_calls_custom_rules_control_flow_and_convolutions():
  params = {"k": grid_array(10, (3, 3, 2, 4)), "w": grid_array(11, (4, 4)),
            "stack": grid_array(12, (3, 4, 4)), "v": grid_array(13, (4, 4))}
  q = ss.quantize(params, None, mask=True)

  @jax.custom_jvp
  def mul(x, w):
    return x @ w

  mul.defjvp(lambda p, t: (mul(*p), t[0] @ p[1] + p[0] @ t[1]))

  @jax.jit
  def inner(x, w):  # a jitted helper: evaluated inline, w decoded inside
    return jnp.tanh(x @ w)

  def f(p, img):
    h = lax.conv_general_dilated(img, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = h.mean(axis=(1, 2))
    x = inner(x, p["w"])
    x = mul(x, p["v"])
    x = jax.checkpoint(lambda x, w: jnp.sin(x @ w))(x, p["w"])
    x, _ = lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, p["stack"])
    return lax.cond(x.sum() > 0, lambda x: x @ p["w"], lambda x: x @ p["v"], x)

  img = jnp.asarray(np.random.default_rng(14).normal(size=(2, 5, 5, 2)), jnp.float32)
  assert_same(jitted(f)(q, img), naive(f)(q, img))
  assert_same(ss.compressed_apply(f, q, img), f(ss.dequantize(q), img))
  loss = lambda g: lambda img: jnp.sum(g(img) ** 2)
  np.testing.assert_allclose(jax.grad(loss(lambda i: ss.compressed_apply(f, q, i)))(img),
                             jax.grad(loss(lambda i: f(ss.dequantize(q), i)))(img), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# Flax.


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for width in (16, 16, 3):
      x = nn.Dense(width)(x)
      x = nn.relu(x) if width != 3 else x
    return x


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(6, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 16, rngs=rngs)
    self.l3 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


X6 = jnp.asarray(np.random.default_rng(20).normal(size=(4, 6)), jnp.float32)


def test_flax_linen_mlp():
  model = LinenMLP()
  params = model.init(jax.random.key(0), X6)["params"]
  q = ss.cluster_weights(params, 4, key=jax.random.key(1))
  f = lambda p, x: model.apply({"params": p}, x)
  assert_same(jitted(f)(q, X6), naive(f)(q, X6))
  assert_same(ss.compressed_apply(f, q, X6), f(ss.dequantize(q), X6))


def test_flax_nnx_mlp():
  graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)), nnx.Param)
  q = ss.cluster_weights(state, 4, key=jax.random.key(1))
  f = lambda p, x: nnx.merge(graphdef, p)(x)
  assert_same(jitted(f)(q, X6), naive(f)(q, X6))
  assert_same(ss.compressed_apply(f, q, X6), f(ss.dequantize(q), X6))


# ----------------------------------------------------------------------------
# Memory: one decoded layer at a time, not all of them.


def mlp(p, x):
  for layer in p:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x


@functools.lru_cache(maxsize=None)
def mlp_case(layers: int, width: int, clusters: int):
  keys = jax.random.split(jax.random.key(0), layers)
  params = [{"w": jax.random.normal(k, (width, width)) / width**0.5, "b": jnp.zeros(width)} for k in keys]
  q = ss.cluster_weights(params, clusters, key=jax.random.key(1), init="linear")
  x = jax.random.normal(jax.random.key(2), (32, width))
  return q, x


def temp_bytes(fn, *args) -> int:
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("clusters", [16, 4])
def test_peak_temporaries_hold_a_few_layers_not_the_model(clusters):
  q, x = mlp_case(6, 512, clusters)
  packed = sum(a.nbytes for a in jax.tree.leaves(q))
  layer = 512 * 512 * 4
  bound = packed + 3 * layer + 64 * 1024  # packed + 3 dense layers + activations
  assert temp_bytes(jitted(mlp), q, x) <= bound
  assert temp_bytes(naive(mlp), q, x) > bound  # the naive jit decodes all six layers first
  assert_same(jitted(mlp)(q, x), naive(mlp)(q, x))


def test_peak_temporaries_do_not_grow_with_depth():
  small = temp_bytes(jitted(mlp), *mlp_case(2, 256, 16))
  deep = temp_bytes(jitted(mlp), *mlp_case(8, 256, 16))
  assert deep <= small + 64 * 1024


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_activations_on_a_mesh(axis_type):
  # The tie reads one element of the activation: under explicit sharding a
  # sharded axis cannot be sliced to one element, so it is reduced instead.
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((8,), ("d",), axis_types=(getattr(AxisType, axis_type),))
  q, x = mlp_case(2, 64, 16)
  qs = jax.device_put(q, NamedSharding(mesh, P()))
  xs = jax.device_put(jnp.concatenate([x, -x]), NamedSharding(mesh, P("d")))
  assert_same(jitted(mlp)(qs, xs), naive(mlp)(qs, xs))


# ----------------------------------------------------------------------------
# Bad input.


def test_bad_input_raises_naming_the_argument(plain_case):
  params, q, x = plain_case
  with pytest.raises(ValueError, match="quantized"):
    ss.compressed_apply(plain, params, x)
  with pytest.raises(ValueError, match="apply_fn"):
    ss.compressed_apply("plain", q, x)
