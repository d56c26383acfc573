"""Grouped codebooks (``axis=``), 0-8 bit indices, codebook dtypes, and the exact fast assignment.

References are independent: per-group ``np.unique`` on the group's own slice,
a bit-by-bit stream built with ``np.packbits``, the float64 argmax over every
component evaluated here, and hand counts of the report's bits.
"""

from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softshare_jax as ss
from softshare_jax.compress import keep
from softshare_jax.compress.quantized import pack
from softshare_jax.compress.quantized import unpack


def groups_of(w: np.ndarray, axis) -> list[np.ndarray]:
  """The groups of ``w`` (C order over the other axes), each flattened: an independent reference."""
  axes = tuple(sorted(a % w.ndim for a in ((axis,) if isinstance(axis, int) else axis)))
  rest = [a for a in range(w.ndim) if a not in axes]
  out = []
  for pos in np.ndindex(*[w.shape[a] for a in rest]):
    sl = [slice(None)] * w.ndim
    for a, p in zip(rest, pos):
      sl[a] = p
    out.append(w[tuple(sl)].reshape(-1))
  return out


def values_with_few_per_group(rng, shape, axis, per_group):
  w = np.empty(shape, np.float32)
  for g in groups_of(np.arange(math.prod(shape)).reshape(shape), axis):
    book = rng.normal(size=per_group).astype(np.float32)
    w.reshape(-1)[g] = book[rng.integers(0, per_group, g.size)]
  return w


# ----------------------------------------------------------------------------
# Grouped codebooks.


@pytest.mark.parametrize("shape,axis", [((6, 5), 0), ((6, 5), 1), ((6, 5), -2), ((3, 3, 2, 4), (0, 1, 2)),
                                        ((3, 3, 2, 4), (1, 3)), ((4, 7), (0, 1))])
def test_each_group_has_its_own_sorted_codebook_padded_with_its_last_entry(shape, axis):
  rng = np.random.default_rng(1)
  w = values_with_few_per_group(rng, shape, axis, 5)
  leaf = ss.quantize({"w": jnp.asarray(w)}, None, axis=axis).tree["w"]
  groups = groups_of(w, axis)
  book = np.asarray(leaf.codebook).reshape(-1, leaf.entries)
  if len(groups) == 1:
    assert leaf.axis is None and leaf.codebook.ndim == 1  # all axes: the plain (K,) leaf
  else:
    assert leaf.codebook.shape == (len(groups), max(np.unique(g).size for g in groups))
  ids = np.asarray(leaf.group_ids()).reshape(-1)
  idx = np.asarray(leaf.unpacked())
  flat_positions = groups_of(np.arange(w.size).reshape(shape), axis)
  for gi, (g, pos) in enumerate(zip(groups, flat_positions)):
    want = np.unique(g)
    np.testing.assert_array_equal(book[gi, :want.size], want)
    assert np.all(book[gi, want.size:] == want[-1])  # padding repeats the group's last entry
    assert np.all(ids[pos] == gi)
    np.testing.assert_array_equal(book[gi][idx[pos]], g)
  np.testing.assert_array_equal(np.asarray(ss.dequantize(ss.quantize({"w": jnp.asarray(w)}, None, axis=axis))["w"]), w)


def test_a_prox_trained_layer_exports_per_neuron_bit_identically(tmp_path):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2048, 24)), jnp.float32)
  kernel = ss.prox_weight_sharing(x, 2.0, axis=0)  # one group per output neuron (column)
  k = np.asarray(kernel)
  per_column = [np.unique(k[:, j]).size for j in range(k.shape[1])]
  assert np.unique(k).size > 1000 and max(per_column) <= 256
  with pytest.raises(ValueError, match="codebook entries per leaf"):
    ss.quantize({"kernel": kernel}, None)  # one codebook for the whole tensor cannot hold it
  q = ss.quantize({"kernel": kernel}, None, axis=0)
  assert q.tree["kernel"].codebook.shape == (24, max(per_column))
  assert q.tree["kernel"].bits == math.ceil(math.log2(max(per_column)))
  np.testing.assert_array_equal(np.asarray(ss.dequantize(q)["kernel"]), k)
  ss.save_quantized(tmp_path / "q", q)
  np.testing.assert_array_equal(np.asarray(ss.dequantize(ss.load_quantized(tmp_path / "q"))["kernel"]), k)


def test_quantize_with_a_mixture_per_group_matches_a_per_group_reference():
  rng = np.random.default_rng(3)
  m = ss.Mixture(free_means=jnp.array([-0.6, -0.2, 0.3, 0.7]), log_precisions=jnp.full(5, 3.0),
                 logits=jnp.zeros(4), zero_logit=jnp.array(1.0))
  w = rng.normal(size=(40, 6)).astype(np.float32) * 0.5
  w[:, 0] = np.abs(w[:, 0])  # column 0 never uses the negative means
  q = ss.quantize({"w": jnp.asarray(w)}, m, axis=0)
  plain = np.asarray(ss.dequantize(ss.quantize({"w": jnp.asarray(w)}, m))["w"])
  np.testing.assert_array_equal(np.asarray(ss.dequantize(q)["w"]), plain)  # groups change storage, not values
  book = np.asarray(q.tree["w"].codebook)
  for j in range(6):
    want = np.unique(plain[:, j])
    np.testing.assert_array_equal(book[j, :want.size], want)
  assert np.all(book[0] >= 0)


def test_cluster_weights_per_group_is_k_means_of_each_group_alone():
  rng = np.random.default_rng(4)
  w = rng.normal(size=(64, 5)).astype(np.float32) * np.arange(1, 6, dtype=np.float32)
  q = ss.cluster_weights({"w": jnp.asarray(w)}, 4, key=jax.random.key(0), axis=0, init="linear")
  got = np.asarray(ss.dequantize(q)["w"])
  for j in range(5):
    alone = ss.cluster_weights({"w": jnp.asarray(w[:, j:j + 1])}, 4, key=jax.random.key(0), init="linear")
    np.testing.assert_array_equal(got[:, j], np.asarray(ss.dequantize(alone)["w"])[:, 0])
  assert q.tree["w"].codebook.shape == (5, 4) and q.tree["w"].bits == 2
  seeded = ss.cluster_weights({"w": jnp.asarray(w)}, 4, key=jax.random.key(0), axis=0)
  assert seeded.tree["w"].codebook.shape == (5, 4)


def test_hash_clusters_refuses_an_axis():
  with pytest.raises(ValueError, match="axis must be None"):
    ss.hash_clusters({"w": jnp.ones((4, 4))}, 3, key=jax.random.key(0), axis=0)


def test_bad_axis_and_codebook_dtype_raise():
  with pytest.raises(ValueError, match="out of range"):
    ss.quantize({"w": jnp.ones((4, 4))}, None, axis=2)
  with pytest.raises(ValueError, match="codebook_dtype"):
    ss.quantize({"w": jnp.ones((4, 4))}, None, codebook_dtype="float64")


def test_keep_clusters_keeps_each_groups_clusters_apart():
  # The value 1.0 is in both columns' codebooks: two clusters, one per neuron.
  w = jnp.array([[1.0, 1.0], [1.0, 1.0], [0.0, 2.0]])
  q = ss.quantize({"w": w}, None, axis=0)
  tx = ss.keep_clusters(q)
  u, _ = tx.update({"w": jnp.array([[1.0, 10.0], [3.0, 20.0], [5.0, 7.0]])}, tx.init(ss.dequantize(q)))
  np.testing.assert_array_equal(np.asarray(u["w"]), [[2.0, 15.0], [2.0, 15.0], [0.0, 7.0]])


# ----------------------------------------------------------------------------
# Bit widths and packing.


def reference_stream(idx: np.ndarray, bits: int) -> np.ndarray:
  """Index i in bits [i·bits, (i+1)·bits), least significant first: bit by bit."""
  stream = np.zeros(idx.size * bits, np.uint8)
  for j in range(bits):
    stream[j::bits] = (idx >> j) & 1
  return np.packbits(stream, bitorder="little")


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(k=st.integers(1, 256), n=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_packing_round_trips_at_every_width(k, n, seed):
  bits = max(1, math.ceil(math.log2(k)))
  idx = np.random.default_rng(seed).integers(0, k, n)
  packed = pack(idx, bits)
  np.testing.assert_array_equal(packed, reference_stream(idx, bits))
  assert packed.size == -(-n * bits // 8)
  np.testing.assert_array_equal(unpack(packed, bits, n, np), idx)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda p: unpack(p, bits, n))(jnp.asarray(packed))), idx)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 64, 65, 128, 129, 256])
def test_quantize_uses_ceil_log2_k_bits(k):
  w = np.arange(k, dtype=np.float32)[np.random.default_rng(k).integers(0, k, (23, 13))]
  w.reshape(-1)[:k] = np.arange(k)
  leaf = ss.quantize({"w": jnp.asarray(w)}, None).tree["w"]
  assert leaf.bits == max(1, math.ceil(math.log2(k)))  # K = 1 takes 1 bit (Orbax refuses empty arrays)
  assert leaf.indices.size == -(-w.size * leaf.bits // 8)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.values())(leaf)), w)


# ----------------------------------------------------------------------------
# Codebook dtypes.


@pytest.mark.parametrize("cb", ["bfloat16", "float16"])
@pytest.mark.parametrize("axis", [None, 0])
def test_narrow_float_codebooks_hold_the_rounded_values(cb, axis):
  rng = np.random.default_rng(5)
  w = values_with_few_per_group(rng, (50, 4), 0, 7)
  leaf = ss.quantize({"w": jnp.asarray(w)}, None, axis=axis, codebook_dtype=cb).tree["w"]
  assert leaf.codebook.dtype == jnp.dtype(cb) and leaf.scale is None
  want = w.astype(jnp.dtype(cb)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(ss.dequantize(ss.Quantized({"w": leaf}))["w"]), want)


@pytest.mark.parametrize("axis", [None, 0])
def test_int8_codebooks_have_a_float32_scale_per_group(axis):
  rng = np.random.default_rng(6)
  w = values_with_few_per_group(rng, (50, 4), 0, 9)
  leaf = ss.quantize({"w": jnp.asarray(w)}, None, axis=axis, codebook_dtype="int8").tree["w"]
  assert leaf.codebook.dtype == jnp.int8 and leaf.scale.dtype == jnp.float32
  cols = [w.reshape(-1)] if axis is None else [w[:, j] for j in range(4)]
  assert leaf.scale.shape == (() if axis is None else (4,))
  got = np.asarray(ss.dequantize(ss.Quantized({"w": leaf}))["w"])
  for j, col in enumerate(cols):
    scale = np.float32(np.max(np.abs(col)).astype(np.float64) / 127)
    assert np.asarray(leaf.scale).reshape(-1)[j] == scale
    want = (np.clip(np.rint(col.astype(np.float64) / scale), -127, 127).astype(np.float32) * scale)
    np.testing.assert_array_equal(got.reshape(-1) if axis is None else got[:, j], want)
  assert np.abs(np.asarray(leaf.codebook)).max() == 127


def test_bfloat16_params_keep_their_dtype_and_report_against_16_bits():
  w = jnp.asarray(values_with_few_per_group(np.random.default_rng(7), (32, 8), 0, 3), jnp.bfloat16)
  q = ss.quantize({"w": w}, None, axis=0)
  assert ss.dequantize(q)["w"].dtype == jnp.bfloat16
  r = ss.compression_report(q)
  assert r.total.dense_bits == 32 * 256 and r.total.own_bits == 16 * 256
  assert r.ratio_own == pytest.approx(r.ratio / 2)


# ----------------------------------------------------------------------------
# The report counts every group's codebook.


def test_report_counts_every_groups_codebook_by_hand():
  # 2 groups (columns): column 0 uses {0, 1}, column 1 uses {0, 2, 3}: K = 3, 2-bit indices.
  w = jnp.array([[1.0, 2.0], [0.0, 3.0], [1.0, 0.0], [0.0, 2.0]])
  for cb, entry_bits, scale_bits in [("float32", 32, 0), ("bfloat16", 16, 0), ("int8", 8, 32)]:
    q = ss.quantize({"w": w}, None, axis=0, codebook_dtype=cb)
    r = ss.compression_report(q).leaves[0]
    book = (2 + 3) * entry_bits + 2 * scale_bits  # each group's own entries (not the padding)
    entries = 5  # non-zeros; gaps <= 32: no fillers
    pointers = (2 + 1) * math.ceil(math.log2(entries + 1))
    assert (r.codebook, r.nonzeros, r.fillers) == (3, 5, 0)
    assert r.csr_bits == entries * (5 + 2) + book + pointers
    assert r.packed_bits == 8 * math.ceil(8 * 2 / 8) + 2 * 3 * entry_bits + 2 * scale_bits  # the file's padding too


# ----------------------------------------------------------------------------
# The fast assignment is the float64 argmax over every component, bit for bit.


def brute_force(w: np.ndarray, m: ss.Mixture, use_weights: bool) -> np.ndarray:
  mu, gamma, log_pi = (np.asarray(a, np.float64) for a in (m.means, m.log_precisions, m.log_weights))
  base = 0.5 * gamma + (log_pi if use_weights else 0.0)
  t = np.square(np.asarray(w, np.float64).reshape(-1, 1) - mu) * (-0.5 * np.exp(gamma)) + base
  return mu[np.argmax(t, axis=1)]  # first index on ties


def tricky_mixtures():
  yield "tie at zero", ss.Mixture(jnp.array([-1.0, 1.0]), jnp.zeros(3), jnp.zeros(2), jnp.array(-50.0))
  yield "equal precisions", ss.Mixture(jnp.linspace(-1, 1, 7), jnp.full(8, 2.0), jnp.zeros(7), jnp.array(0.0))
  yield "hidden", ss.Mixture(jnp.array([0.01, 0.5]), jnp.array([3.0, 3.0, 3.0]), jnp.array([-30.0, 0.0]),
                             jnp.array(0.0))
  yield "duplicates", ss.Mixture(jnp.array([0.3, 0.3, -0.3]), jnp.array([2.0, 2.0, 2.0, 1.0]), jnp.zeros(3),
                                 jnp.array(0.0))
  yield "narrow inside wide", ss.Mixture(jnp.array([0.2, 0.2]), jnp.array([0.0, 12.0, -2.0]),
                                         jnp.array([0.0, -3.0]), jnp.array(0.0))


@pytest.mark.parametrize("name,m", list(tricky_mixtures()), ids=[n for n, _ in tricky_mixtures()])
@pytest.mark.parametrize("assignment", ["map", "ml"])
def test_fast_assignment_equals_brute_force_on_tricky_mixtures(name, m, assignment):
  rng = np.random.default_rng(8)
  w = np.concatenate([rng.normal(size=4000) * 0.8, np.linspace(-2, 2, 4001), [0.0, -0.0, 0.3, -0.3, 0.2]])
  w = w.astype(np.float32).reshape(-1, 1)
  got = np.asarray(ss.dequantize(ss.quantize({"w": jnp.asarray(w)}, m, assignment=assignment))["w"]).ravel()
  want = brute_force(w, m, assignment == "map").astype(np.float32) + np.float32(0)
  np.testing.assert_array_equal(got, want)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(k=st.integers(1, 12), seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-3, 1.0, 30.0]))
def test_fast_assignment_equals_brute_force_on_random_mixtures(k, seed, scale):
  rng = np.random.default_rng(seed)
  m = ss.Mixture(jnp.asarray(rng.normal(size=k) * scale, jnp.float32), jnp.asarray(rng.normal(size=k + 1) * 3),
                 jnp.asarray(rng.normal(size=k)), jnp.asarray(rng.normal()))
  w = (rng.normal(size=3000) * scale * rng.choice([0.3, 3.0])).astype(np.float32).reshape(-1, 2)
  got = np.asarray(ss.dequantize(ss.quantize({"w": jnp.asarray(w)}, m))["w"]).ravel()
  np.testing.assert_array_equal(got, brute_force(w, m, True).astype(np.float32) + np.float32(0))


def test_keep_clusters_sums_of_large_clusters_match_float64():
  # Clusters of ~1e5 weights: one float32 scatter-add over a whole cluster drifts by ~6e-6 of
  # Σ|u|; per-block partial sums stay near float32's own rounding (~1e-7).
  rng = np.random.default_rng(5)
  w = np.round(rng.normal(size=(512, 1024)) * 2) / 2
  _, seg = np.unique(w, return_inverse=True)
  seg = seg.reshape(w.shape)
  n = int(seg.max()) + 1
  u = (0.05 * np.sin(rng.normal(size=w.shape)) + 1.0).astype(np.float32)
  got = np.asarray(jax.jit(keep.cluster_sums, static_argnums=2)(jnp.asarray(u), jnp.asarray(seg), n))
  ref = np.bincount(seg.ravel(), u.ravel().astype(np.float64), n)
  scale = np.bincount(seg.ravel(), np.abs(u.ravel()).astype(np.float64), n)
  assert np.max(np.abs(got - ref) / scale) < 5e-7
