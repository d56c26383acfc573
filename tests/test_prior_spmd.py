"""mixture_prior under SPMD sharding: shard-local passes, O(K) collectives, bounded memory.

Checked on the 8-device CPU platform of the root conftest.py from the compiled
update (``jit(...).lower(...).compile()``): the HLO text for collectives and
``memory_analysis()`` for temporaries. Also the passes behind it
(``statistics.leaf_pass`` in blocks, ``statistics.tree_pass`` over many
leaves, each in its own pass) against a float64 NumPy reference.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import softshare_jax as ss
from softshare_jax.mixture import statistics
from softshare_jax.mixture.model import Mixture

FREE = 16
K = FREE + 1
SHAPE = (512, 1024)  # 2 MiB per kernel: several CPU chunks of 2**18 // K weights.
_COLLECTIVE = re.compile(
    r"=\s*(?P<shapes>.*?)\s(?P<op>all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
    r"(?:-start)?\(")
_ARRAY = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def _mesh_1d():
  return Mesh(np.array(jax.devices()).reshape(8), ("x",))


def _mesh_2d():
  return Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))


# name -> (mesh, spec of kernel "a", spec of kernel "b", kernel shape)
LAYOUTS = {
    "rows_and_cols": (_mesh_1d, P("x", None), P(None, "x"), SHAPE),
    "rows": (_mesh_1d, P("x", None), P("x", None), SHAPE),
    "2d_both_axes": (_mesh_2d, P("a", "b"), P("b", "a"), SHAPE),
    # 125 rows per device: blocks must keep a multiple of 8 rows.
    "odd_rows_and_cols": (_mesh_1d, P("x", None), P(None, "x"), (1000, 520)),
}


def _params(shape=SHAPE):
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  return {
      "a": {"kernel": 0.1 * jax.random.normal(k1, shape, jnp.float32), "bias": jnp.zeros(shape[1])},
      "b": {"kernel": 0.1 * jax.random.normal(k2, shape, jnp.float32)},
      # Small replicated kernels.
      "small": [{"kernel": 0.1 * jax.random.normal(k, (16, 24), jnp.float32)} for k in jax.random.split(k3, 3)],
  }


def _shardings(mesh, spec_a, spec_b):
  rep = NamedSharding(mesh, P())
  return {
      "a": {"kernel": NamedSharding(mesh, spec_a), "bias": rep},
      "b": {"kernel": NamedSharding(mesh, spec_b)},
      "small": [{"kernel": rep} for _ in range(3)],
  }


def _update_fn(mode):
  tx = optax.chain(ss.mixture_prior(FREE, 1e-3, mixture_update=mode), optax.adam(1e-3))
  return tx, lambda g, s, p: tx.update(g, s, p)


def _compile(mode, layout):
  mesh_fn, spec_a, spec_b, shape = LAYOUTS[layout]
  mesh = mesh_fn()
  return _compile_tree(mode, _params(shape), _shardings(mesh, spec_a, spec_b), mesh)


def _compile_tree(mode, params, p_sh, mesh):
  """The compiled update of ``params`` sharded as ``p_sh`` (state replicated), and what it needs."""
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  tx, f = _update_fn(mode)
  state = tx.init(params)
  s_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
  jitted = jax.jit(f, in_shardings=(p_sh, s_sh, p_sh))
  compiled = jitted.lower(grads, state, params).compile()
  return compiled, jitted, (grads, state, params), p_sh, f


def _collectives(hlo: str) -> list[tuple[str, int, str]]:
  """(op, largest element count among its shapes, the line) for every collective in ``hlo``."""
  found = []
  for line in hlo.splitlines():
    m = _COLLECTIVE.search(line)
    if m is None:
      continue
    sizes = [math.prod(int(d) for d in dims.split(",") if d) for dims in _ARRAY.findall(m.group("shapes"))]
    found.append((m.group("op"), max(sizes, default=0), line.strip()[:200]))
  return found


def test_collective_parser_sees_a_gather():
  """The HLO parser is not blind: an explicit gather of a sharded kernel shows as a param-sized all-gather."""
  mesh = _mesh_1d()
  x = jnp.zeros(SHAPE)
  f = jax.jit(lambda x: jax.lax.with_sharding_constraint(x * 2, NamedSharding(mesh, P())),
              in_shardings=NamedSharding(mesh, P("x", None)))
  found = _collectives(f.lower(x).compile().as_text())
  assert any(op == "all-gather" and size == math.prod(SHAPE) for op, size, _ in found), found


def _assert_shard_local(compiled, params, p_sh, temp_slack=16 * 2**20):
  """Only O(K) all-reduces cross devices, the updates keep the params' sharding, temporaries stay small."""
  found = _collectives(compiled.as_text())
  # Only the O(K) statistics may cross devices: no collective moves more than a few K-vectors' worth.
  big = [(op, size, line) for op, size, line in found if size > 64 * K]
  assert not big, big
  assert not [f for f in found if f[0] in ("all-gather", "all-to-all", "collective-permute")], found
  assert any(op == "all-reduce" for op, _, _ in found), "the statistics must be summed across devices"
  out_sh = compiled.output_shardings[0]
  for got, want, p in zip(jax.tree.leaves(out_sh), jax.tree.leaves(p_sh), jax.tree.leaves(params)):
    assert got.is_equivalent_to(want, p.ndim), (got, want)
  # Temporaries: a small multiple of the device's own params.
  per_device = sum(p.nbytes // math.prod(p.shape) * math.prod(s.shard_shape(p.shape))
                   for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(p_sh)))
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= 4 * per_device + temp_slack, (temp, per_device)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mode", ["gradient", "em"])
def test_update_is_shard_local(mode, layout):
  compiled, _, (grads, state, params), p_sh, _ = _compile(mode, layout)
  _assert_shard_local(compiled, params, p_sh)


@pytest.mark.parametrize("layout", ["rows_and_cols", "2d_both_axes"])
@pytest.mark.parametrize("mode", ["gradient", "em"])
def test_sharded_values_equal_unsharded(mode, layout):
  _, jitted, (grads, state, params), p_sh, f = _compile(mode, layout)
  _assert_equals_one_device(jitted, f, grads, state, params, p_sh)


# Many small kernels, each FSDP-sharded over the 8 devices along one axis or another
# (rows, columns, a conv kernel's output channels): 20 leaves of 4e3 to 1e4 weights,
# more than one CPU chunk (2**18 // K) in all.
_SMALL_SHAPES = [(104, 96), (64, 64), (3, 3, 16, 32), (96, 104)]
_SMALL_SPECS = [P(None, "x"), P("x", None), P(None, None, None, "x"), P("x", None)]


def _many_small():
  keys = jax.random.split(jax.random.key(3), 20)
  params = {f"k{i:02d}": 0.1 * jax.random.normal(k, _SMALL_SHAPES[i % 4], jnp.float32) for i, k in enumerate(keys)}
  mesh = _mesh_1d()
  return params, {f"k{i:02d}": NamedSharding(mesh, _SMALL_SPECS[i % 4]) for i in range(20)}, mesh


@pytest.mark.parametrize("mode", ["gradient", "em"])
def test_many_small_sharded_leaves_are_never_gathered(mode):
  """Small leaves are not joined into one vector: that gathered every sharded one to each device."""
  params, p_sh, mesh = _many_small()
  compiled, jitted, (grads, state, params), p_sh, f = _compile_tree(mode, params, p_sh, mesh)
  # Slack for the temporaries of one CPU chunk (a few (2**18 // K, K) float32 arrays).
  _assert_shard_local(compiled, params, p_sh, temp_slack=8 * 4 * statistics.CHUNK_BUDGET)
  _assert_equals_one_device(jitted, f, grads, state, params, p_sh)


def _assert_equals_one_device(jitted, f, grads, state, params, p_sh):
  """The sharded update (updates, mixture, state) equals the same update on one device."""
  sharded = jitted(jax.device_put(grads, p_sh), state, jax.device_put(params, p_sh))
  one = jax.devices()[0]
  local = jax.jit(f)(*jax.device_put((grads, state, params), one))
  # Adam's first step is lr·g/(|g| + 1e-8): where the prior's gradient nearly cancels the loss's
  # (|g| ~ 1e-7 out of terms of 1e-3), float32 rounding of g, which other fusions on 8 devices round
  # otherwise, moves the update by up to lr·Δg/1e-8 with Δg ~ 1e-10: so 1e-4 of lr = 1e-3.
  for got, want in zip(jax.tree.leaves(sharded[0]), jax.tree.leaves(local[0])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
  got_m, want_m = ss.get_mixture(sharded[1]), ss.get_mixture(local[1])
  for got, want in zip(jax.tree.leaves(got_m), jax.tree.leaves(want_m)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # The rest of the state (the mixture optimizer's moments) holds the raw mixture gradients, sums over
  # 1M weights that nearly cancel (Σ r·(w − μ)): another order of summation moves them by float32
  # rounding of the summed magnitudes, so they are compared at that scale.
  for got, want in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(local[1])):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * float(np.max(np.abs(want), initial=0.0)))
  assert not np.allclose(got_m.means, ss.get_mixture(state).means)  # the mixture did move


# ---------------------------------------------------------------------------
# The passes behind it, against float64 NumPy.


def _mixture(k: int = 4) -> Mixture:
  return Mixture(free_means=jnp.linspace(-0.3, 0.3, k - 1), log_precisions=jnp.linspace(2.0, 4.0, k),
                 logits=jnp.linspace(-0.5, 0.5, k - 1), zero_logit=jnp.array(1.0), has_zero=True)


def _reference(m: Mixture, w: np.ndarray):
  """Gradient and statistics in float64, skipping non-finite and huge weights."""
  w = np.asarray(w, np.float64)
  ok = np.isfinite(w) & (np.abs(w) <= 1e12)
  x = np.where(ok, w, 0.0)[..., None]
  mu = np.asarray(m.means, np.float64)
  lam = np.exp(np.asarray(m.log_precisions, np.float64))
  lj = np.log(np.asarray(m.weights, np.float64)) + 0.5 * np.log(lam / (2 * np.pi)) - 0.5 * lam * (x - mu) ** 2
  r = np.exp(lj - lj.max(-1, keepdims=True))
  r = np.where(ok[..., None], r / r.sum(-1, keepdims=True), 0.0)
  d = x - mu
  axes = tuple(range(w.ndim))
  return (np.sum(r * lam * d, -1), ok.sum(), np.sum(r, axes), np.sum(r * d, axes), np.sum(r * d * d, axes))


def _check(grad, stats, m, w):
  g, count, mass, first, second = _reference(m, w)
  np.testing.assert_allclose(grad, g, rtol=2e-5, atol=1e-4)
  assert float(stats.count) == count
  np.testing.assert_allclose(stats.mass, mass, rtol=2e-5, atol=1e-4)
  np.testing.assert_allclose(stats.first, first, rtol=2e-5, atol=1e-4)
  np.testing.assert_allclose(stats.second, second, rtol=2e-5, atol=1e-4)


@pytest.mark.parametrize("shape,chunk", [((48, 40), 64), ((6, 10, 7), 8), ((4099,), 256), ((3, 5), 4),
                                         ((1000, 12), 1000)])
def test_leaf_pass_in_blocks_matches_float64(shape, chunk):
  m = _mixture()
  w = np.random.default_rng(0).normal(0.0, 0.3, shape).astype(np.float32)
  grad, stats = jax.jit(lambda m, w: statistics.leaf_pass(m, w, chunk))(m, w)
  assert grad.shape == shape
  _check(grad, stats, m, w)


def test_blocked_pass_leaves_out_broken_weights():
  m = _mixture()
  w = np.random.default_rng(1).normal(0.0, 0.3, (32, 24)).astype(np.float32)
  w[3, 5], w[17, 0], w[31, 23], w[8, 8] = np.nan, np.inf, -1e20, 2e12
  grad, stats = jax.jit(lambda m, w: statistics.leaf_pass(m, w, 32))(m, w)
  assert statistics.block_shape(w.shape, 32) is not None  # the shape-preserving path
  assert np.all(np.isfinite(grad)) and all(np.all(np.isfinite(x)) for x in stats)
  assert grad[3, 5] == grad[17, 0] == grad[31, 23] == grad[8, 8] == 0.0
  _check(grad, stats, m, w)


def test_tree_pass_matches_float64_without_joining_leaves():
  m = _mixture()
  rng = np.random.default_rng(2)
  leaves = [rng.normal(0.0, 0.3, s).astype(np.float32) for s in [(64, 64)] * 5 + [(300, 100), (7,), (0, 3)]]
  leaves[1][0, 0] = np.nan
  grads, total = jax.jit(lambda m, xs: statistics.tree_pass(m, xs, 500))(m, leaves)
  flat = np.concatenate([x.ravel() for x in leaves])
  for g, x in zip(grads, leaves):
    assert g.shape == x.shape
  _check(jnp.concatenate([g.ravel() for g in grads]), total, m, flat)
  # No leaf is joined to another (that gathers sharded leaves): the only concatenation is of
  # the K means (the zero mean and the free ones).
  jaxpr = str(jax.make_jaxpr(lambda m, xs: statistics.tree_pass(m, xs))(m, leaves))
  joined = [int(math.prod(int(d) for d in dims.split(",") if d))
            for dims in re.findall(r":f32\[([\d,]*)\] = concatenate", jaxpr)]
  assert joined and max(joined) <= m.num_components, joined


def test_many_leaves_keep_temporaries_of_one_chunk():
  """Independent per-leaf passes would run side by side (50x the params for 100 leaves of 1e4 on CPU)."""
  rng = np.random.default_rng(4)
  params = {f"k{i:02d}": jnp.asarray(rng.normal(0.0, 0.1, (104, 96)).astype(np.float32)) for i in range(40)}
  tx, f = _update_fn("gradient")
  state = tx.init(params)
  one = jax.devices()[0]
  args = jax.device_put((jax.tree.map(jnp.ones_like, params), state, params), one)
  temp = jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes
  param_bytes = sum(p.nbytes for p in params.values())
  assert temp <= 2 * param_bytes + 8 * 4 * statistics.CHUNK_BUDGET, (temp, param_bytes)


def test_block_shape():
  assert statistics.block_shape((2048, 4096), 4096) == (64, 64)
  # 1000 = 2³·5³: blocks keep a multiple of 8 rows and columns, for 8 shards of either axis.
  assert statistics.block_shape((1000, 4000), 1024) == (8, 80)
  for shape, chunk in [((2048, 4096), 4096), ((1000, 4000), 512), ((3, 3, 64, 128), 1000), ((640, 640), 4096),
                       ((4096, 11008), 15420), ((1000, 512), 15420), ((6, 10, 7), 8)]:
    block = statistics.block_shape(shape, chunk)
    assert math.prod(block) <= chunk
    assert all(s % o == 0 for s, o in zip(shape, block))
    steps = math.prod(shape) // math.prod(block)
    assert steps <= 2 * -(-math.prod(shape) // chunk)
  assert statistics.block_shape((4099,), 1000) is None  # a prime: flattened and padded instead


def test_chunk_per_platform():
  """On GPU/TPU a leaf whose n × K fits the budget is one pass, with no loop; on CPU it is chunked."""
  m = _mixture(K)
  w = jnp.zeros((1000, 1000))
  f = jax.jit(lambda m, w: statistics.leaf_pass(m, w))
  cpu = f.trace(m, w).lower(lowering_platforms=("cpu",)).as_text()
  gpu = f.trace(m, w).lower(lowering_platforms=("cuda",)).as_text()
  assert "stablehlo.while" in cpu
  assert "stablehlo.while" not in gpu
  big = jnp.zeros((8000, 1000))  # n × K above 2**26: chunked on GPU too
  assert "stablehlo.while" in jax.jit(lambda m, w: statistics.leaf_pass(m, w)).trace(m, big).lower(
      lowering_platforms=("cuda",)).as_text()
