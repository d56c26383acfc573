"""Conformance: every gradient transformation of the package runs through here.

Each test is parametrized over ``TRANSFORMS``. A new transform joins the suite
by adding one entry: ``pytest.param(Entry(factory_fn, kwargs), id="name")``.
``Entry()`` (no arguments) builds the plain transform ``factory_fn(**kwargs)``;
``entry.injected()`` builds ``optax.inject_hyperparams(factory_fn)(**kwargs)``.

The transforms are called directly with random ``updates`` (what an optimizer
would hand them) and the params of ``make_params``: a dict with a 2-D kernel
``(16, 16)`` (square, so that tying can tie it to its own transpose) and a 1-D
bias ``(16,)``. Entries must be configured so that the
transform changes the updates of that tree (``test_transform_acts`` checks
it), otherwise the comparisons below would pass trivially.

Where an expected value is needed it is computed independently by calling the
plain transform eagerly (no jit, no wrapper).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import softshare_jax as ss


@dataclasses.dataclass(frozen=True)
class Entry:
  """A transform under test: its factory and the hyperparameters it gets.

  Attributes:
    factory_fn: the package's factory, e.g. ``ss.weight_sharing_prox``.
    kwargs: the arguments; numeric ones become injectable hyperparameters under
      ``optax.inject_hyperparams``.
    static_args: names of arguments that ``optax.inject_hyperparams`` must not
      turn into hyperparameters: callables that are not schedules, and ints or
      floats that are structural (``axis``). Passed as its ``static_args``.
    prepare: None, or ``params -> params`` applied to ``make_params``'s tree
      by :meth:`params`, which the tests use (hard_tie: ``ss.sync``, since its
      init wants members that start equal).
  """

  factory_fn: Callable[..., optax.GradientTransformation]
  kwargs: dict = dataclasses.field(default_factory=dict)
  static_args: tuple = ()
  prepare: Callable[[Any], Any] | None = None

  def __call__(self) -> optax.GradientTransformation:
    return self.factory_fn(**self.kwargs)

  def params(self, seed: int = 0, dtype=jnp.float32) -> dict:
    """``make_params``, then ``prepare`` (hard_tie's init wants members that start equal: ``ss.sync``)."""
    params = make_params(seed, dtype)
    return params if self.prepare is None else self.prepare(params)

  def injected(self) -> optax.GradientTransformation:
    return optax.inject_hyperparams(self.factory_fn, static_args=self.static_args)(**self.kwargs)


_PROX = dict(strength=0.5, learning_rate=0.1)
_SELF_TIE = [["kernel", ss.transposed("kernel")]]


def _sync_self_tie(params: dict) -> dict:
  return ss.sync(params, _SELF_TIE)


TRANSFORMS = [
    pytest.param(Entry(ss.weight_sharing_prox, dict(_PROX)), id="prox"),
    pytest.param(Entry(ss.weight_sharing_prox, dict(_PROX, method="host")), id="prox-host"),
    pytest.param(Entry(ss.weight_sharing_prox, dict(_PROX, method="device")), id="prox-device"),
    # Per-column groups and an l1 term. ``axis`` is an int, which
    # inject_hyperparams would treat as a numeric hyperparameter: mark it static.
    pytest.param(
        Entry(ss.weight_sharing_prox, dict(_PROX, l1=0.3, axis=0), static_args=("axis",)),
        id="prox-axis0-l1",
    ),
    # Tying acts within the kernel (the masked and partition tests see the
    # kernel alone): the kernel tied to its own transpose, a symmetric matrix.
    pytest.param(Entry(ss.soft_tie, dict(groups=_SELF_TIE, strength=0.5)), id="soft_tie"),
    pytest.param(
        Entry(ss.soft_tie, dict(groups=_SELF_TIE, strength=optax.linear_schedule(0.5, 2.0, 4))),
        id="soft_tie-schedule",
    ),
    # hard_tie's init checks that the members start equal: the kernel made symmetric.
    pytest.param(Entry(ss.hard_tie, dict(groups=_SELF_TIE), prepare=_sync_self_tie), id="hard_tie"),
    pytest.param(Entry(ss.hard_tie, dict(groups=_SELF_TIE, reduce="mean"), prepare=_sync_self_tie),
                 id="hard_tie-mean"),
    # Mixture prior: ``num_components`` is structural (an int): static.
    pytest.param(
        Entry(ss.mixture_prior, dict(num_components=4, strength=0.05), static_args=("num_components",)),
        id="mixture_prior",
    ),
    pytest.param(
        Entry(ss.mixture_prior, dict(num_components=4, strength=0.05, mixture_update="em",
                                     precision_prior=(2.0, 0.5)), static_args=("num_components",)),
        id="mixture_prior-em",
    ),
]

# ----------------------------------------------------------------------------
# Data.

KERNEL_SHAPE = (16, 16)
BIAS_SHAPE = (16,)


def make_params(seed: int = 0, dtype=jnp.float32) -> dict:
  """Weights with spread (std 1 and 0.5), so a prox step merges some of them."""
  rng = np.random.default_rng(seed)
  return {
      "kernel": jnp.asarray(rng.normal(0.0, 1.0, KERNEL_SHAPE), dtype),
      "bias": jnp.asarray(rng.normal(0.0, 0.5, BIAS_SHAPE), dtype),
  }


def make_updates(seed: int = 1, dtype=jnp.float32, scale: float = 0.1) -> dict:
  """An optimizer's step: small random values with the params' structure."""
  rng = np.random.default_rng(seed)
  return {
      "kernel": jnp.asarray(rng.normal(0.0, scale, KERNEL_SHAPE), dtype),
      "bias": jnp.asarray(rng.normal(0.0, scale, BIAS_SHAPE), dtype),
  }


def stacked_updates(n: int, seed: int = 10) -> dict:
  steps = [make_updates(seed + i) for i in range(n)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *steps)


# keep_clusters acts on a quantized tree with the params' structure: the
# kernel clustered into 8 shared values, the bias kept.
_CLUSTERED = ss.cluster_weights(make_params(), 8, key=jax.random.key(0))
TRANSFORMS += [
    pytest.param(Entry(ss.keep_clusters, dict(quantized=_CLUSTERED)), id="keep_clusters"),
    pytest.param(Entry(ss.keep_clusters, dict(quantized=_CLUSTERED, reduce="sum")), id="keep_clusters-sum"),
]

parametrize_transforms = pytest.mark.parametrize("entry", TRANSFORMS)


TIGHT = dict(rtol=1e-6, atol=1e-6)


def assert_trees_close(actual: Any, expected: Any, **tol) -> None:
  tol = tol or TIGHT
  a_leaves, a_def = jax.tree.flatten(actual)
  e_leaves, e_def = jax.tree.flatten(expected)
  assert a_def == e_def, f"tree structures differ: {a_def} vs {e_def}"
  for a, e in zip(a_leaves, e_leaves):
    assert jnp.shape(a) == jnp.shape(e)
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(e, np.float64), **tol
    )


def shapes_and_dtypes(tree: Any) -> Any:
  return jax.tree.map(lambda x: (tuple(jnp.shape(x)), jnp.result_type(x)), tree)


def run_steps(tx, params, updates_list, state=None):
  """Plain eager reference: apply ``tx`` step by step; returns params, state, outs."""
  state = tx.init(params) if state is None else state
  outs = []
  for u in updates_list:
    out, state = tx.update(u, state, params)
    outs.append(out)
    params = optax.apply_updates(params, out)
  return params, state, outs


# ----------------------------------------------------------------------------
# Tests.


@parametrize_transforms
def test_transform_acts(entry):
  """Guard for the rest: the transform changes the updates on the test tree."""
  tx = entry()
  params, updates = entry.params(), make_updates()
  out, _ = tx.update(updates, tx.init(params), params)
  assert shapes_and_dtypes(out) == shapes_and_dtypes(updates)
  diff = np.abs(np.asarray(out["kernel"]) - np.asarray(updates["kernel"]))
  assert diff.max() > 1e-3, "the transform left the kernel's updates unchanged"
  assert np.all(np.isfinite(np.asarray(out["kernel"])))


@parametrize_transforms
def test_jit_no_recompilation(entry):
  tx = entry()
  traces = []

  def update(u, s, p):
    traces.append(None)
    return tx.update(u, s, p)

  f = jax.jit(update)
  params = entry.params()
  u1, u2 = make_updates(1), make_updates(2)
  state = tx.init(params)
  out1, state1 = f(u1, state, params)
  params2 = optax.apply_updates(params, out1)
  # Second call: new values of the same shapes, and the state the first call
  # returned (a dtype or weak-type drift in the state would retrace).
  out2, state2 = f(u2, state1, params2)
  jax.block_until_ready(out2)
  assert len(traces) == 1, f"traced {len(traces)} times"
  assert f._cache_size() == 1
  assert shapes_and_dtypes(state1) == shapes_and_dtypes(state)
  # The second call really used the new values.
  ref1, ref_state1 = tx.update(u1, state, params)
  ref2, _ = tx.update(u2, ref_state1, params2)
  assert_trees_close(out1, ref1, rtol=1e-5, atol=1e-6)
  assert_trees_close(out2, ref2, rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(out1["kernel"]), np.asarray(out2["kernel"]))


@parametrize_transforms
def test_inject_hyperparams_matches_plain(entry):
  plain, injected = entry(), entry.injected()
  params = entry.params()
  updates_list = [make_updates(20 + i) for i in range(3)]
  f_plain, f_inj = jax.jit(plain.update), jax.jit(injected.update)
  s_plain, s_inj = plain.init(params), injected.init(params)
  p_plain = p_inj = params
  for u in updates_list:
    o_plain, s_plain = f_plain(u, s_plain, p_plain)
    o_inj, s_inj = f_inj(u, s_inj, p_inj)
    assert_trees_close(o_inj, o_plain, rtol=1e-5, atol=1e-6)
    p_plain = optax.apply_updates(p_plain, o_plain)
    p_inj = optax.apply_updates(p_inj, o_inj)
  assert_trees_close(p_inj, p_plain, rtol=1e-5, atol=1e-6)
  assert_trees_close(s_inj.inner_state, s_plain, rtol=1e-5, atol=1e-6)
  assert f_inj._cache_size() == 1


@parametrize_transforms
def test_multi_steps(entry):
  tx = entry()
  ms = optax.MultiSteps(tx, every_k_schedule=2)
  f = jax.jit(ms.update)
  params = entry.params()
  updates_list = [make_updates(30 + i) for i in range(4)]

  # Reference: the plain transform on the mean of each pair, eagerly.
  ref_state = tx.init(params)
  ref_params = params

  state = ms.init(params)
  p = params
  for i, u in enumerate(updates_list):
    out, state = f(u, state, p)
    if i % 2 == 0:  # accumulation step
      for leaf in jax.tree.leaves(out):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    else:  # emit step
      mean = jax.tree.map(lambda a, b: (a + b) / 2, updates_list[i - 1], u)
      expected, ref_state = tx.update(mean, ref_state, ref_params)
      assert_trees_close(out, expected, rtol=1e-5, atol=1e-5)
      ref_params = optax.apply_updates(ref_params, expected)
      assert np.abs(np.asarray(out["kernel"])).max() > 0
    p = optax.apply_updates(p, out)
  assert_trees_close(p, ref_params, rtol=1e-5, atol=1e-5)
  assert_trees_close(state.inner_opt_state, ref_state, rtol=1e-5, atol=1e-5)


@parametrize_transforms
def test_scan_matches_python_loop(entry):
  tx = entry()
  params = entry.params()
  us = stacked_updates(5)

  def step(carry, u):
    p, s = carry
    out, s = tx.update(u, s, p)
    return (optax.apply_updates(p, out), s), None

  (p_scan, s_scan), _ = jax.jit(lambda c, us: jax.lax.scan(step, c, us))(
      (params, tx.init(params)), us
  )

  jstep = jax.jit(step)
  carry = (params, tx.init(params))
  for i in range(5):
    carry, _ = jstep(carry, jax.tree.map(lambda x: x[i], us))
  p_loop, s_loop = carry

  assert_trees_close(p_scan, p_loop)
  assert_trees_close(s_scan, s_loop)
  # And the loop did move the params.
  assert not np.allclose(np.asarray(p_loop["kernel"]), np.asarray(params["kernel"]))


@parametrize_transforms
def test_abstract_init_and_update(entry):
  tx = entry()
  params, updates = entry.params(), make_updates()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  real_state = tx.init(params)

  # init called on ShapeDtypeStruct leaves.
  state_from_sds = tx.init(abstract)
  assert jax.tree.structure(state_from_sds) == jax.tree.structure(real_state)
  assert shapes_and_dtypes(state_from_sds) == shapes_and_dtypes(real_state)

  # eval_shape of init, on abstract and on real params.
  for p in (abstract, params):
    state_shape = jax.eval_shape(tx.init, p)
    assert jax.tree.structure(state_shape) == jax.tree.structure(real_state)
    assert shapes_and_dtypes(state_shape) == shapes_and_dtypes(real_state)

  # eval_shape of update.
  out_shape, new_state_shape = jax.eval_shape(tx.update, updates, real_state, abstract)
  assert shapes_and_dtypes(out_shape) == shapes_and_dtypes(params)
  assert jax.tree.structure(new_state_shape) == jax.tree.structure(real_state)
  assert shapes_and_dtypes(new_state_shape) == shapes_and_dtypes(real_state)


@parametrize_transforms
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_keeps_dtype(entry, dtype):
  tx = entry()
  params, updates = entry.params(dtype=dtype), make_updates(dtype=dtype)
  out, _ = jax.jit(tx.update)(updates, tx.init(params), params)
  for leaf in jax.tree.leaves(out):
    assert leaf.dtype == dtype
  # Values: the same step in float32 on the same (representable) values.
  up32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  p32, u32 = up32(params), up32(updates)
  ref, _ = tx.update(u32, tx.init(p32), p32)
  tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-3)
  assert_trees_close(up32(out), ref, **tol)


@parametrize_transforms
def test_none_updates_pass_through(entry):
  tx = entry()
  params, updates = entry.params(), make_updates()
  state = tx.init(params)
  partial = {"kernel": updates["kernel"], "bias": None}
  for update in (tx.update, jax.jit(tx.update)):
    out, _ = update(partial, state, params)
    assert out["bias"] is None
    ref, _ = tx.update(updates, state, params)
    assert_trees_close(out["kernel"], ref["kernel"], rtol=1e-5, atol=1e-6)


@parametrize_transforms
def test_inside_masked(entry):
  params = entry.params()
  updates_list = [make_updates(40 + i) for i in range(2)]
  tx = optax.masked(entry(), {"kernel": True, "bias": False})
  f = jax.jit(tx.update)
  state, p = tx.init(params), params
  outs = []
  for u in updates_list:
    out, state = f(u, state, p)
    outs.append(out)
    p = optax.apply_updates(p, out)
  # Reference: the plain transform on the kernel alone.
  kernel_only = [{"kernel": u["kernel"]} for u in updates_list]
  _, _, ref = run_steps(entry(), {"kernel": params["kernel"]}, kernel_only)
  for out, u, r in zip(outs, updates_list, ref):
    np.testing.assert_array_equal(np.asarray(out["bias"]), np.asarray(u["bias"]))
    assert_trees_close(out["kernel"], r["kernel"], rtol=1e-5, atol=1e-6)


@parametrize_transforms
def test_inside_partition(entry):
  params = entry.params()
  updates_list = [make_updates(50 + i) for i in range(2)]
  tx = optax.partition({"a": entry(), "b": optax.sgd(0.3)}, {"kernel": "a", "bias": "b"})
  f = jax.jit(tx.update)
  state, p = tx.init(params), params
  outs = []
  for u in updates_list:
    out, state = f(u, state, p)
    outs.append(out)
    p = optax.apply_updates(p, out)
  kernel_only = [{"kernel": u["kernel"]} for u in updates_list]
  _, _, ref = run_steps(entry(), {"kernel": params["kernel"]}, kernel_only)
  for out, u, r in zip(outs, updates_list, ref):
    np.testing.assert_allclose(np.asarray(out["bias"]), -0.3 * np.asarray(u["bias"]), rtol=1e-6)
    assert_trees_close(out["kernel"], r["kernel"], rtol=1e-5, atol=1e-6)


@parametrize_transforms
@pytest.mark.parametrize("kernel_spec", [P(None, "x"), P("x", None)], ids=["cols", "rows"])
def test_sharded_params(entry, kernel_spec):
  assert jax.device_count() == 8, "conftest.py should force 8 CPU devices"
  mesh = Mesh(np.array(jax.devices()).reshape(8), ("x",))
  shardings = {
      "kernel": NamedSharding(mesh, kernel_spec),
      "bias": NamedSharding(mesh, P()),
  }
  tx = entry()
  params, updates = entry.params(), make_updates()
  ref, ref_state = jax.jit(tx.update)(updates, tx.init(params), params)

  params_s = jax.device_put(params, shardings)
  updates_s = jax.device_put(updates, shardings)
  state_s = tx.init(params_s)
  out, new_state = jax.jit(tx.update)(updates_s, state_s, params_s)

  assert_trees_close(out, ref)
  assert_trees_close(new_state, ref_state)
  for name, sharding in shardings.items():
    got = out[name].sharding
    assert got.is_equivalent_to(sharding, out[name].ndim), (
        f"{name}: update sharding {got} is not the param sharding {sharding}"
    )


def test_every_transform_of_the_package_is_in_the_suite():
  import inspect

  factories = {getattr(ss, name) for name in ss.__all__
               if callable(getattr(ss, name)) and not inspect.isclass(getattr(ss, name))
               and "GradientTransformationExtraArgs" in str(inspect.signature(getattr(ss, name)).return_annotation)}
  tested = {p.values[0].factory_fn for p in TRANSFORMS}
  assert {ss.mixture_prior, ss.weight_sharing_prox, ss.keep_clusters} <= factories
  assert factories == tested, f"not in TRANSFORMS: {factories - tested}"
  for p in TRANSFORMS:
    assert isinstance(p.values[0](), optax.GradientTransformationExtraArgs), p.id
