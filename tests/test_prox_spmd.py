"""The prox and the tying transforms under SPMD sharding, read from the compiled HLO.

On the 8-device CPU mesh of conftest.py, two FSDP kernels are sharded along
the axis that does not form the groups: every device must then solve its own
groups with no communication (docs/design.md §6). The checks parse the
compiled update (``as_text()``) for collectives that move a param-sized array
and read ``memory_analysis()`` for its temporaries. Many leaves must share one
host call (or one device kernel), with the per-leaf results bit for bit.
The device kernel runs a chunk of rows at a time: its scratch is a chunk's,
and its results are one call's, bit for bit, and the float64 SciPy prox's.
"""

from __future__ import annotations

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
from softshare_jax import isotonic
from softshare_jax import sharing
from test_sharing import chain_input
from test_sharing import reference_prox
from test_sharing import tol

SHAPE = (512, 1024)  # small enough for a shared CPU; the layout is what matters
MiB = 2**20
COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-gather|all-to-all|collective-permute|all-reduce)(-start)?\(")
ARRAY = re.compile(r"\b(?:f|bf|s|u|pred)\d*\[([\d,]*)\]")


def _mesh() -> Mesh:
  assert jax.device_count() == 8, "conftest.py should force 8 CPU devices"
  return Mesh(np.array(jax.devices()), ("x",))


def collectives(hlo: str) -> list[tuple[str, int, str]]:
  """(kind, elements moved, line) of every collective of the compiled module."""
  found = []
  for line in hlo.splitlines():
    m = COLLECTIVE.search(line)
    if m:
      sizes = [int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) for dims in ARRAY.findall(m.group(1))]
      found.append((m.group(2), sum(sizes), line.strip()[:200]))
  return found


def big_collectives(hlo: str, leaf_size: int, kinds=("all-gather", "all-to-all", "collective-permute")) -> list:
  """Collectives of ``kinds`` that move at least one device's share of a leaf."""
  share = leaf_size // jax.device_count()
  return [c for c in collectives(hlo) if c[0] in kinds and c[1] >= share]


def _kernels(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {name: jnp.asarray(rng.normal(size=SHAPE), jnp.float32) for name in ("a", "b")}


def _sharded_update(tx, params: dict, updates: dict, specs: dict):
  mesh = _mesh()
  shardings = {k: NamedSharding(mesh, specs[k]) for k in params}
  ps, us = jax.device_put(params, shardings), jax.device_put(updates, shardings)
  state = tx.init(ps)
  f = jax.jit(tx.update)
  compiled = f.lower(us, state, ps).compile()
  out, _ = f(us, state, ps)
  return compiled, out, shardings


def test_collective_parser_sees_a_gather():
  mesh = _mesh()
  x = jax.device_put(jnp.zeros(SHAPE), NamedSharding(mesh, P("x", None)))
  hlo = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P())).lower(x).compile().as_text()
  assert big_collectives(hlo, x.size), hlo


@pytest.mark.parametrize("method", ["host", "device"])
@pytest.mark.parametrize("axis", [0, 1])
def test_groups_on_one_device_need_no_communication(axis, method):
  """Groups along ``axis``, kernels sharded along the other axis: each device solves its own."""
  params = _kernels()
  updates = jax.tree.map(lambda p: 0.05 * jnp.sin(p), params)
  spec = P(None, "x") if axis == 0 else P("x", None)
  tx = ss.weight_sharing_prox(0.5, 0.1, axis=axis, method=method)
  compiled, out, shardings = _sharded_update(tx, params, updates, {"a": spec, "b": spec})
  hlo = compiled.as_text()
  assert not big_collectives(hlo, params["a"].size), "\n".join(c[2] for c in big_collectives(hlo, params["a"].size))
  if method == "host":  # one custom call per device program, on its own block
    assert hlo.count(f'custom_call_target="{sharing.HOST_TARGET}"') == 2
    assert "python_cpu_callback" not in hlo
  for name, sharding in shardings.items():
    assert out[name].sharding.is_equivalent_to(sharding, 2), (name, out[name].sharding)
  per_device = sum(p.nbytes for p in params.values()) / jax.device_count()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= 4 * per_device + 16 * MiB, f"{temp / MiB:.1f} MiB of temporaries"
  ref, _ = jax.jit(tx.update)(updates, tx.init(params), params)
  for name in params:
    np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(ref[name]))


@pytest.mark.parametrize("method", ["host", "device"])
def test_device_temporaries_are_those_of_the_local_block(method):
  """The sharded update needs no more scratch than the same update on one device's block."""
  params, spec = {"a": _kernels()["a"]}, P(None, "x")
  updates = jax.tree.map(lambda p: 0.05 * jnp.sin(p), params)
  tx = ss.weight_sharing_prox(0.5, 0.1, axis=0, method=method)
  compiled, _, _ = _sharded_update(tx, params, updates, {"a": spec})
  block = {"a": params["a"][:, : SHAPE[1] // jax.device_count()]}
  local = jax.jit(tx.update).lower(block, tx.init(block), block).compile()
  sharded_temp = compiled.memory_analysis().temp_size_in_bytes
  local_temp = local.memory_analysis().temp_size_in_bytes
  assert sharded_temp <= 1.25 * local_temp + MiB, (sharded_temp / MiB, local_temp / MiB)


@pytest.mark.parametrize("method", ["host", "device"])
def test_sharded_group_axis_is_gathered_once_along_it(method):
  """Groups along axis 0 of a kernel sharded along axis 0: one all-gather, along axis 0 only."""
  params = {"a": _kernels()["a"]}
  updates = jax.tree.map(lambda p: 0.05 * jnp.sin(p), params)
  tx = ss.weight_sharing_prox(0.5, 0.1, axis=0, method=method)
  compiled, out, shardings = _sharded_update(tx, params, updates, {"a": P("x", None)})
  big = big_collectives(compiled.as_text(), params["a"].size)
  assert len(big) <= 1, "\n".join(c[2] for c in big)
  assert all(c[0] == "all-gather" and "dimensions={0}" in c[2] for c in big), big
  assert out["a"].sharding.is_equivalent_to(shardings["a"], 2)
  ref, _ = jax.jit(tx.update)(updates, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(out["a"]), np.asarray(ref["a"]))


def test_2d_mesh_keeps_the_other_axis_sharded():
  """Groups along axis 0 sharded over 'g', axis 1 over 'm': only 'g' is gathered."""
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("g", "m"))
  x = jnp.asarray(np.random.default_rng(1).normal(size=SHAPE), jnp.float32)
  sharding = NamedSharding(mesh, P("g", "m"))
  f = jax.jit(lambda x: ss.prox_weight_sharing(x, 0.3, axis=0, method="device"))
  xs = jax.device_put(x, sharding)
  compiled = f.lower(xs).compile()
  gathers = [c for c in collectives(compiled.as_text()) if c[0] != "all-reduce"]
  # One gather of the leaf over the two devices of 'g': a quarter of it, never the whole.
  assert len(gathers) == 1 and gathers[0][1] == x.size // 4, gathers
  np.testing.assert_array_equal(np.asarray(f(xs)), np.asarray(f(x)))


def test_prox_weight_sharing_keeps_the_sharding_eagerly():
  x = jnp.asarray(np.random.default_rng(2).normal(size=SHAPE), jnp.float32)
  sharding = NamedSharding(_mesh(), P(None, "x"))
  got = ss.prox_weight_sharing(jax.device_put(x, sharding), 0.3, axis=0, method="host")
  assert got.sharding.is_equivalent_to(sharding, 2)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ss.prox_weight_sharing(x, 0.3, axis=0, method="host")))


# ----------------------------------------------------------------------------
# The device kernel a chunk of rows at a time: bounded scratch, same bits.

FSDP_SHAPES = {"memory": (16000, 1000), "values": (2000, 1000)}  # rows per device that no chunk divides
# One chunk's scratch: 512 KiB of rows (sharing.CHUNK_BYTES) through a kernel of up to ~19x its input.
CHUNK_SCRATCH = 12 * MiB


def _compiled_update_temp(tx, params: dict) -> tuple[int, str]:
  """Temporaries and text of the compiled ``tx.update`` on ``params`` (ShapeDtypeStructs: compiled, never run)."""
  compiled = jax.jit(tx.update).lower(params, jax.eval_shape(tx.init, params), params).compile()
  return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()


def reference_rows(x: np.ndarray, t: float, axis: int) -> np.ndarray:
  """The float64 prox of every group of ``x`` along ``axis`` (SciPy PAVA row by row)."""
  rows = np.moveaxis(np.asarray(x, np.float64), axis, -1)
  out = np.stack([reference_prox(r, t) for r in rows.reshape(-1, rows.shape[-1])]).reshape(rows.shape)
  return np.moveaxis(out, -1, axis)


def _fsdp_tx(axis: int):
  return optax.chain(optax.sgd(0.1), ss.weight_sharing_prox(1.0, 0.1, axis=axis, method="device"))


def _fsdp_spec(axis: int) -> P:
  return P(None, "x") if axis == 0 else P("x", None)


@pytest.mark.parametrize("axis", [0, 1])
def test_device_prox_under_fsdp_keeps_scratch_within_4x_the_device_params(axis):
  """A (16000, 1000) kernel sharded along the non-group axis: no gather, the scratch of one chunk of rows.

  Each device holds 7.6 MiB: the goal allows 46.5 MiB of temporaries. The
  kernel on the whole block at once took 17x the block (130 MiB); chunked,
  the update needs the block, its fit and one chunk's scratch.
  """
  shape = FSDP_SHAPES["memory"]
  sharding = NamedSharding(_mesh(), _fsdp_spec(axis))
  temp, hlo = _compiled_update_temp(_fsdp_tx(axis), {"a": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)})
  assert not [c for c in collectives(hlo) if c[0] == "all-gather"], collectives(hlo)
  assert not big_collectives(hlo, shape[0] * shape[1])
  per_device = 4 * shape[0] * shape[1] / jax.device_count()
  assert temp <= 4 * per_device + 16 * MiB, f"{temp / MiB:.1f} MiB of temporaries, {temp / per_device:.1f}x"
  assert temp <= 2 * per_device + CHUNK_SCRATCH, f"{temp / MiB:.1f} MiB of temporaries, {temp / per_device:.1f}x"


def test_many_leaves_device_kernel_keeps_the_scratch_of_a_chunk():
  """Leaves that share one device kernel per row length go through it a chunk of rows at a time too."""
  params = {f"w{i}": jax.ShapeDtypeStruct((500, 1000), jnp.float32) for i in range(4)}
  temp, _ = _compiled_update_temp(ss.weight_sharing_prox(0.5, 0.1, axis=1, method="device"), params)
  total = 4 * 4 * 500 * 1000  # 7.6 MiB; one kernel on the 2000 rows took 18x that
  assert temp <= 4 * total + 16 * MiB, f"{temp / MiB:.1f} MiB, {temp / total:.1f}x"
  assert temp <= 2 * total + CHUNK_SCRATCH, f"{temp / MiB:.1f} MiB, {temp / total:.1f}x"


@pytest.mark.parametrize("axis", [0, 1])
def test_device_prox_under_fsdp_in_chunks_equals_the_float64_reference(axis):
  """Each device's 125 rows of 2000 (axis 0) or 250 of 1000 (axis 1) in two overlapping chunks."""
  rng = np.random.default_rng(7)
  params = {"a": jnp.asarray(rng.normal(0.0, 0.05, FSDP_SHAPES["values"]), jnp.float32)}
  grads = {"a": jnp.asarray(rng.normal(0.0, 0.05, FSDP_SHAPES["values"]), jnp.float32)}
  compiled, out, shardings = _sharded_update(_fsdp_tx(axis), params, grads, {"a": _fsdp_spec(axis)})
  assert not big_collectives(compiled.as_text(), params["a"].size)
  assert out["a"].sharding.is_equivalent_to(shardings["a"], 2)
  tentative = np.asarray(params["a"]) - 0.1 * np.asarray(grads["a"])  # float32, as the step computes it
  got = np.asarray(optax.apply_updates(params, out)["a"], np.float64)
  np.testing.assert_allclose(got, reference_rows(tentative, 0.1, axis), rtol=0, atol=tol(tentative, 0.1))
  assert len(np.unique(got[:, 0] if axis == 0 else got[0])) < tentative.shape[axis] // 2  # the prox merged weights


def _hard_rows(rows: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows of every kind the kernel meets (pooling settles, the bounded-depth pass, NaN, t = 0, collapse)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(0.0, 1.0, (rows, d)).astype(np.float32)
  t = rng.uniform(0.0, 1.0, rows).astype(np.float32)
  chain, t_chain = chain_input(d)
  x[5], t[5] = chain, t_chain  # defeats the pooling: the bounded-depth pass runs for its chunk
  x[rows - 3], t[rows - 3] = chain, t_chain  # ... and in the last, overlapping chunk
  x[7, 3] = np.nan
  t[8] = 0.0
  t[9] = 1e30
  x[10] = np.round(x[10] * 2) / 2  # ties
  return x, t


@pytest.mark.parametrize("chunk", [7, 16, 60, 299, 300])
def test_chunked_device_prox_is_one_kernel_call_bit_for_bit(chunk):
  """300 rows in chunks that mostly do not divide them: every row equals the one-call kernel's."""
  x, t = _hard_rows(300, 64, seed=chunk)
  whole = jax.jit(isotonic.prox_rows_device)(x, t)
  chunked = jax.jit(sharing.prox_rows_chunked, static_argnums=2)(x, t, chunk)
  np.testing.assert_array_equal(np.asarray(chunked), np.asarray(whole))
  assert np.isnan(np.asarray(chunked)[7]).all() and np.array_equal(np.asarray(chunked)[8], x[8])
  np.testing.assert_allclose(np.asarray(chunked)[5], reference_prox(x[5], float(t[5])), atol=tol(x[5], t[5]))


@pytest.mark.parametrize(("rows", "d", "itemsize", "platform", "want"), [
    (128, 4000, 4, "cpu", 32), (500, 1000, 4, "cpu", 131), (500, 1000, 8, "cpu", 65),
    (3, 2**20, 4, "cpu", 1), (10, 10, 4, "cpu", 10), (4096, 1024, 4, "other", 256),
    (2**16, 2**10, 4, "other", 2**12), (2**20, 2**10, 4, "other", 2**14), (0, 5, 4, "cpu", 0)])
def test_chunk_rows_bounds_the_chunk_in_bytes(rows, d, itemsize, platform, want):
  assert sharing.chunk_rows(rows, d, itemsize, platform) == want


def test_chunk_rows_names_a_bad_platform():
  with pytest.raises(ValueError, match="platform must be one of .* got 'tpu'"):
    sharing.chunk_rows(4, 4, 4, "tpu")


def test_many_leaves_device_path_in_chunks_matches_each_leaf_and_the_reference():
  """Three leaves of 300 rows of 600, one kernel loop in five chunks of 218 rows (the last overlapping)."""
  rng = np.random.default_rng(11)
  params = {f"w{i}": jnp.asarray(rng.normal(0.0, 0.05, (300, 600)), jnp.float32) for i in range(3)}
  updates = jax.tree.map(lambda p: 0.05 * jnp.cos(3 * p), params)
  tx = ss.weight_sharing_prox(0.5, 0.1, axis=1, method="device")
  out, _ = jax.jit(tx.update)(updates, tx.init(params), params)
  _assert_equals_each_leaf(tx, out, updates, params)
  tentative = np.asarray(params["w1"]) + np.asarray(updates["w1"])
  got = np.asarray(optax.apply_updates(params, out)["w1"], np.float64)
  np.testing.assert_allclose(got, reference_rows(tentative, 0.05, 1), rtol=0, atol=tol(tentative, 0.05))


def test_auto_method_on_cpu_is_the_host_custom_call_alone():
  """The default method on CPU lowers to the host kernel only: no device kernel (no sort, no loop)."""
  params = {"a": _kernels()["a"]}
  tx = ss.weight_sharing_prox(0.5, 0.1, axis=0)
  compiled, _, _ = _sharded_update(tx, params, jax.tree.map(jnp.zeros_like, params), {"a": P(None, "x")})
  hlo = compiled.as_text()
  assert hlo.count(f'custom_call_target="{sharing.HOST_TARGET}"') == 1
  assert not re.search(r"\bsort\(|\bwhile\(", hlo)


# ----------------------------------------------------------------------------
# Many leaves: one host call, one kernel.


def _many(n: int = 100, seed: int = 3) -> dict:
  rng = np.random.default_rng(seed)
  shapes = [(16, 16), (8, 32), (32,), (4, 4, 4)]
  return {f"w{i:03d}": jnp.asarray(rng.normal(size=shapes[i % len(shapes)]), jnp.float32) for i in range(n)}


def _subjaxprs(value) -> list:
  if hasattr(value, "eqns"):  # a Jaxpr
    return [value]
  if hasattr(getattr(value, "jaxpr", None), "eqns"):  # a ClosedJaxpr
    return [value.jaxpr]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _subjaxprs(v)]
  return []


def _host_calls(jaxpr) -> int:
  """Host-kernel calls one run makes: custom calls to the trampoline and pure_callbacks.

  Of a ``cond`` (``platform_dependent``'s choice among backends) one branch runs.
  """
  count = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "pure_callback" or (name == "ffi_call" and eqn.params.get("target_name") == sharing.HOST_TARGET):
      count += 1
    elif name == "cond":
      count += max(_host_calls(b.jaxpr) for b in eqn.params["branches"])
    else:
      count += sum(_host_calls(j) for v in eqn.params.values() for j in _subjaxprs(v))
  return count


@pytest.mark.parametrize("axis", [None, 0])
def test_many_leaves_share_one_host_call_and_match_each_leaf(axis):
  params = _many()
  updates = jax.tree.map(lambda p: 0.05 * jnp.cos(3 * p), params)
  tx = ss.weight_sharing_prox(0.5, 0.1, axis=axis, method="host")
  jaxpr = jax.make_jaxpr(tx.update)(updates, tx.init(params), params)
  assert _host_calls(jaxpr.jaxpr) == 1
  hlo = jax.jit(tx.update).lower(updates, tx.init(params), params).compile().as_text()
  assert hlo.count(f'custom_call_target="{sharing.HOST_TARGET}"') == 1
  out, _ = jax.jit(tx.update)(updates, tx.init(params), params)
  _assert_equals_each_leaf(tx, out, updates, params)


def _assert_equals_each_leaf(tx, out, updates, params):
  one_leaf = jax.jit(tx.update)  # one key for all leaves: compiled once per shape
  for name, p in params.items():
    one, _ = one_leaf({"w": updates[name]}, tx.init({"w": p}), {"w": p})
    np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(one["w"]), err_msg=name)


def test_many_leaves_share_one_device_kernel_per_group_length():
  params = {f"w{i}": jnp.asarray(np.random.default_rng(i).normal(size=(8, 24)), jnp.float32) for i in range(12)}
  updates = jax.tree.map(lambda p: 0.05 * jnp.cos(3 * p), params)
  tx = ss.weight_sharing_prox(0.5, 0.1, axis=0, method="device")

  def sorts(tree):
    hlo = jax.jit(tx.update).lower(jax.tree.map(lambda p: 0 * p, tree), tx.init(tree), tree).as_text()
    return len(re.findall(r"stablehlo\.sort|\bsort\(", hlo))

  assert sorts(params) == sorts({"w0": params["w0"]})
  out, _ = jax.jit(tx.update)(updates, tx.init(params), params)
  _assert_equals_each_leaf(tx, out, updates, params)


def test_many_leaves_keep_nan_groups_dtypes_and_errors():
  with jax.enable_x64(True):
    params = {"nan": jnp.array([[1.0, np.nan], [2.0, 3.0]], jnp.float32), "f64": jnp.array([1.0, 1.0 + 1e-10, 5.0]),
              "bf16": jnp.array([0.3, 0.31, -0.2], jnp.bfloat16), "empty": jnp.zeros((0, 3)), "scalar": jnp.float32(2.0)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = ss.weight_sharing_prox(0.5, 0.1, l1=0.1, method="host")
    out, _ = tx.update(zeros, tx.init(params), params)
    assert np.isnan(np.asarray(out["nan"])).all()
    assert out["f64"].dtype == jnp.float64 and out["bf16"].dtype == jnp.bfloat16 and out["empty"].shape == (0, 3)
    for name in params:
      one, _ = tx.update({name: zeros[name]}, tx.init({name: params[name]}), {name: params[name]})
      np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(one[name]), err_msg=name)
    tx0 = ss.weight_sharing_prox(0.5, 0.1, axis=0, method="host")
    with pytest.raises(ValueError, match="leaf 'scalar'"):
      tx0.update(zeros, tx0.init(params), params)


# ----------------------------------------------------------------------------
# The tying transforms and keep_clusters are shard-local.


@pytest.mark.parametrize("kind", [
    "soft_tie", "hard_tie", "keep_clusters"])
def test_tying_and_keep_clusters_stay_shard_local(kind):
  rng = np.random.default_rng(5)
  a = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  params = {"a": a, "b": a + 0.0 if kind == "hard_tie" else jnp.asarray(rng.normal(size=SHAPE), jnp.float32)}
  if kind == "soft_tie":
    tx = ss.soft_tie([["a", "b"]], strength=0.5)
  elif kind == "hard_tie":
    tx = ss.hard_tie([["a", "b"]])
  else:
    q = ss.cluster_weights(params, 4, key=jax.random.key(0))
    params = ss.dequantize(q)
    tx = ss.keep_clusters(q)
  updates = jax.tree.map(lambda p: 0.05 * jnp.sin(p), params)
  spec = {"a": P(None, "x"), "b": P(None, "x")}
  compiled, out, shardings = _sharded_update(tx, params, updates, spec)
  big = big_collectives(compiled.as_text(), SHAPE[0] * SHAPE[1], kinds=("all-gather", "all-to-all"))
  assert not big, "\n".join(c[2] for c in big)
  for name, sharding in shardings.items():
    assert out[name].sharding.is_equivalent_to(sharding, 2), (name, out[name].sharding)
  ref, _ = jax.jit(tx.update)(updates, tx.init(params), params)
  for name in params:
    np.testing.assert_allclose(np.asarray(out[name]), np.asarray(ref[name]), rtol=1e-6, atol=1e-7)
