"""Tests of compression: quantize, the baselines, the report, files, keep_clusters.

References: brute force in float64 (SciPy densities, a dense distance matrix
for k-means), bit counts worked out by hand, and ``jax.grad`` of hand-written
shared-parameter models. ``merge_components``' properties (mass conserved,
idempotent) are tested in test_mixture.py.
"""

from __future__ import annotations

import math
import os

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import softshare_jax as ss
from softshare_jax.compress import hashing
from softshare_jax.compress import report
from test_mixture import make as mixture  # a Mixture from all-component values


def params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {"dense": {"kernel": jnp.asarray(rng.normal(0, 0.3, (30, 7)), dtype),
                    "bias": jnp.asarray(rng.normal(0, 0.1, (7,)), dtype)},
          "conv": {"kernel": jnp.asarray(rng.normal(0, 0.3, (3, 3, 2, 4)), dtype)}}


def assert_quantized_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------
# quantize / dequantize.


@pytest.mark.parametrize("assignment", ["map", "ml"])
@pytest.mark.parametrize("has_zero", [True, False])
def test_quantize_matches_scipy_argmax(assignment, has_zero):
  means = [0.0, -0.6, -0.2, 0.3, 0.7] if has_zero else [-0.6, -0.2, 0.3, 0.7]
  sds = [0.05, 0.2, 0.1, 0.3, 0.15] if has_zero else [0.2, 0.1, 0.3, 0.15]
  weights = [0.6, 0.1, 0.1, 0.1, 0.1] if has_zero else [0.1, 0.4, 0.4, 0.1]
  m = mixture(means, sds, weights, has_zero)
  p = params(1)
  q = ss.quantize(p, m, assignment=assignment)
  out = ss.dequantize(q)
  mu = np.asarray(m.means, np.float64)
  sd = np.asarray(m.stddevs, np.float64)
  pi = np.asarray(m.weights, np.float64) if assignment == "map" else np.ones(len(mu))
  for name in ("dense", "conv"):
    w = np.asarray(p[name]["kernel"], np.float64)
    dens = np.stack([pi[j] * stats.norm.pdf(w, mu[j], sd[j]) for j in range(len(mu))])
    want = mu[np.argmax(dens, axis=0)].astype(np.float32)
    np.testing.assert_array_equal(np.asarray(out[name]["kernel"]), want)
  np.testing.assert_array_equal(out["dense"]["bias"], p["dense"]["bias"])  # 1-D: not masked
  assert not isinstance(q.tree["dense"]["bias"], ss.QuantizedLeaf)


def test_map_and_ml_differ_where_the_proportions_decide():
  m = mixture([0.0, 0.5], [0.2, 0.2], [0.99, 0.01], True)
  p = {"w": jnp.full((2, 2), 0.3)}  # closer to 0.5, but π_0 = 0.99 takes it under "map"
  assert float(ss.dequantize(ss.quantize(p, m, assignment="map"))["w"][0, 0]) == 0.0
  assert float(ss.dequantize(ss.quantize(p, m, assignment="ml"))["w"][0, 0]) == 0.5


def test_zero_component_gives_exact_zeros_and_unused_components_are_dropped():
  m = mixture([0.0, -1.0, 1.0, 5.0], [0.1, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1], True)
  w = jnp.array([[0.02, -0.03, 1.1], [0.9, -0.01, 0.0]])  # nobody near -1 or 5
  leaf = ss.quantize({"w": w}, m).tree["w"]
  np.testing.assert_array_equal(np.asarray(leaf.codebook), [0.0, 1.0])
  assert leaf.bits == 1  # ceil(log2 K) bits per index
  out = np.asarray(ss.dequantize(ss.quantize({"w": w}, m))["w"])
  assert np.count_nonzero(out == 0.0) == 4 and not np.any(np.signbit(out[out == 0]))


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(k=st.integers(1, 40), n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
                  bf16=st.booleans())
def test_quantize_dequantize_is_a_fixed_point(k, n, seed, bf16):
  rng = np.random.default_rng(seed)
  book = rng.normal(size=k) * rng.choice([0.0, 1.0], size=k, p=[0.2, 0.8])
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  p = {"w": jnp.asarray(book[rng.integers(0, k, (n, 2))], dtype)}
  q = ss.quantize(p, None)
  out = ss.dequantize(q)
  np.testing.assert_array_equal(np.asarray(out["w"], np.float32), np.asarray(p["w"], np.float32))
  assert out["w"].dtype == dtype
  assert_quantized_equal(ss.quantize(out, None), q)
  leaf = q.tree["w"]
  assert list(np.asarray(leaf.codebook)) == sorted(set(np.asarray(p["w"], np.float32).ravel().tolist()))


def test_quantize_with_the_mixture_is_idempotent_for_separated_components():
  m = mixture([0.0, -0.5, 0.4], [0.05, 0.1, 0.1], [0.5, 0.25, 0.25], True)
  q = ss.quantize(params(2), m)
  assert_quantized_equal(ss.quantize(ss.dequantize(q), m), q)


@pytest.mark.parametrize("k,bits,dtype", [(1, 1, np.uint8), (2, 1, np.uint8), (4, 2, np.uint8), (5, 3, np.uint8),
                                          (16, 4, np.uint8), (17, 5, np.uint8), (256, 8, np.uint8)])
def test_index_packing(k, bits, dtype):
  n = 1001  # not a multiple of 8: the last byte is padded
  rng = np.random.default_rng(k)
  idx = rng.integers(0, k, n)
  idx[:k] = np.arange(k)
  leaf = ss.quantize({"w": jnp.asarray(np.arange(k, dtype=np.float32)[idx].reshape(7, 143))}, None).tree["w"]
  assert leaf.bits == bits and leaf.indices.dtype == dtype
  assert leaf.indices.size == -(-n * bits // 8)  # a dense bit stream
  np.testing.assert_array_equal(np.asarray(leaf.unpacked()), idx)
  if bits:  # index i sits in bits [i·bits, (i+1)·bits) of the little-endian stream
    stream = np.unpackbits(np.asarray(leaf.indices), bitorder="little")
    first = [int(sum(int(stream[i * bits + j]) << j for j in range(bits))) for i in range(8)]
    assert first == list(idx[:8])


def test_wide_packing_for_many_buckets():
  leaf = ss.hash_clusters({"w": jnp.ones((40, 40))}, 300, key=jax.random.key(0)).tree["w"]
  assert leaf.bits == 16 and leaf.indices.dtype == np.uint16
  np.testing.assert_array_equal(np.asarray(leaf.unpacked()), hashing.hash_positions(1600, leaf.hash_seed, 300))


def test_dequantize_under_jit():
  q = ss.quantize(params(3), mixture([0.0, -0.4, 0.4], [0.1, 0.2, 0.2], [0.4, 0.3, 0.3], True))
  eager = ss.dequantize(q)
  jitted = jax.jit(ss.dequantize)(q)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(a, b)


def test_quantize_errors():
  p = params()
  m = mixture([0.0, 1.0], [0.1, 0.1], [0.5, 0.5], True)
  with pytest.raises(ValueError, match="assignment"):
    ss.quantize(p, m, assignment="mode")
  with pytest.raises(ValueError, match="mixture"):
    ss.quantize(p, {"means": 1})
  with pytest.raises(ValueError, match="256"):
    ss.quantize({"w": jnp.linspace(0, 1, 300).reshape(20, 15)}, None)
  with pytest.raises(ValueError, match="non-finite"):
    ss.quantize({"w": jnp.array([[jnp.nan, 1.0]])}, m)
  with pytest.raises(ValueError, match="mask"):
    ss.quantize({"b": jnp.ones(3)}, m)
  with pytest.raises(ValueError, match="not a floating-point"):
    ss.quantize({"i": jnp.ones((2, 2), jnp.int32)}, m, mask={"i": True})
  with pytest.raises(ValueError, match="quantized"):
    ss.dequantize({"w": 1})


# ----------------------------------------------------------------------------
# cluster_weights and hash_clusters.


def brute_force_kmeans_cost(w, centres):
  return float(np.sum(np.min(np.square(w[:, None] - np.asarray(centres)[None, :]), axis=1)))


@pytest.mark.parametrize("init", ["kmeans++", "linear"])
def test_cluster_weights_recovers_planted_clusters(init):
  rng = np.random.default_rng(0)
  centres = np.array([-0.8, -0.3, 0.1, 0.5, 0.9])
  labels = rng.integers(0, 5, (64, 32))
  w = centres[labels] + rng.normal(0, 0.01, labels.shape)
  q = ss.cluster_weights({"w": jnp.asarray(w, jnp.float32)}, 5, key=jax.random.key(1), init=init)
  leaf = q.tree["w"]
  np.testing.assert_allclose(np.asarray(leaf.codebook), centres, atol=0.003)
  # Every weight takes its planted cluster, and the codebook entries are the cluster means.
  np.testing.assert_array_equal(np.asarray(leaf.unpacked()).reshape(w.shape), labels)
  means = [w[labels == j].mean() for j in range(5)]
  np.testing.assert_allclose(np.asarray(leaf.codebook), means, rtol=1e-6)


def test_cluster_weights_is_a_lloyd_fixed_point_and_beats_random_centres():
  rng = np.random.default_rng(4)
  w = rng.normal(0, 1, 2000)
  leaf = ss.cluster_weights({"w": jnp.asarray(w.reshape(40, 50), jnp.float32)}, 8,
                            key=jax.random.key(0)).tree["w"]
  c = np.asarray(leaf.codebook, np.float64)
  w32 = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
  assign = np.argmin(np.square(w32[:, None] - c[None, :]), axis=1)
  np.testing.assert_array_equal(np.asarray(leaf.unpacked()), assign)  # nearest centre, by brute force
  np.testing.assert_allclose(c, [w32[assign == j].mean() for j in range(8)], rtol=1e-5, atol=1e-6)
  cost = brute_force_kmeans_cost(w32, c)
  for seed in range(5):
    assert cost < brute_force_kmeans_cost(w32, np.random.default_rng(seed).choice(w32, 8, replace=False))


def test_cluster_weights_with_pruning():
  rng = np.random.default_rng(5)
  w = rng.normal(0, 1, (50, 20))
  q = ss.cluster_weights({"w": jnp.asarray(w, jnp.float32)}, 16, key=jax.random.key(0), prune_fraction=0.75)
  leaf = q.tree["w"]
  out = np.asarray(ss.dequantize(q)["w"])
  assert leaf.codebook.shape[0] == 16 and leaf.bits == 4 and 0.0 in np.asarray(leaf.codebook)
  smallest = np.argsort(np.abs(w).ravel(), kind="stable")[:750]
  assert np.all(out.ravel()[smallest] == 0) and np.count_nonzero(out) == 250


def test_cluster_weights_few_distinct_values_and_errors():
  w = jnp.array([[0.5, 0.5], [-0.25, 0.5]])
  leaf = ss.cluster_weights({"w": w}, 8, key=jax.random.key(0)).tree["w"]
  np.testing.assert_array_equal(np.asarray(leaf.codebook), [-0.25, 0.5])
  for kwargs, name in [({"num_clusters": 0}, "num_clusters"), ({"num_clusters": 300}, "num_clusters"),
                       ({"num_clusters": 4, "init": "random"}, "init"),
                       ({"num_clusters": 4, "prune_fraction": 1.0}, "prune_fraction"),
                       ({"num_clusters": 1, "prune_fraction": 0.5}, "num_clusters")]:
    with pytest.raises(ValueError, match=name):
      ss.cluster_weights({"w": w}, key=jax.random.key(0), **kwargs)
  with pytest.raises(ValueError, match="key"):
    ss.cluster_weights({"w": w}, 2)


def test_hash_clusters_buckets_are_means_of_their_positions():
  p = params(6)
  q = ss.hash_clusters(p, 10, key=jax.random.key(3))
  seeds = set()
  for name in ("dense", "conv"):
    leaf = q.tree[name]["kernel"]
    w = np.asarray(p[name]["kernel"], np.float64).ravel()
    idx = hashing.hash_positions(w.size, leaf.hash_seed, 10)
    assert np.bincount(idx, minlength=10).min() > 0  # all buckets in use here
    want = [w[idx == b].mean() for b in range(10)]
    np.testing.assert_allclose(np.asarray(leaf.codebook), want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(ss.dequantize(q)[name]["kernel"]).ravel(),
                                  np.asarray(leaf.codebook)[idx])
    seeds.add(leaf.hash_seed)
  assert len(seeds) == 2  # each tensor gets its own hash
  # The hash spreads positions evenly: a chi-square test on 10 buckets over 10^5 positions.
  counts = np.bincount(hashing.hash_positions(100_000, 12345, 10), minlength=10)
  assert stats.chisquare(counts).pvalue > 1e-4
  with pytest.raises(ValueError, match="num_buckets"):
    ss.hash_clusters(p, 0, key=jax.random.key(0))
  with pytest.raises(ValueError, match="key"):
    ss.hash_clusters(p, 4)


# ----------------------------------------------------------------------------
# The report: bit counts by hand.


def test_csr_bits_by_hand_dense_with_filler():
  # One output unit (rows = the last axis), a column of 40 inputs; non-zeros
  # 0.5 at rows 0, 3 and 39, -1.0 at row 4.
  w = np.zeros((40, 1), np.float32)
  w[[0, 3, 39], 0] = 0.5
  w[4, 0] = -1.0
  r = ss.compression_report(ss.quantize({"w": jnp.asarray(w)}, None)).leaves[0]
  # Gaps from column -1: 1, 3, 1, 35. 35 > 2^5 = 32: one filler zero.
  # Entries 4 + 1 = 5; codebook {-1, 0, 0.5}: K = 3, 2 bits per index.
  # Bits: 5 × (5 + 2) + 3 × 32 + (1 + 1) pointers × ceil(log2 6) = 35 + 96 + 6.
  assert (r.kind, r.weights, r.nonzeros, r.codebook, r.fillers) == ("dense", 40, 4, 3, 1)
  assert r.csr_bits == 35 + 96 + 6
  assert r.dense_bits == 40 * 32
  assert r.packed_bits == 8 * 10 + 96  # 40 two-bit indices = 10 bytes
  # Huffman: gap symbols {1: 2, 3: 1, 3 (=35-32): 1, 32 (filler): 1} -> counts 2,2,1 -> 5 + 3 = 8 bits;
  # index symbols {0.5: 3, -1: 1, 0 (filler): 1} -> counts 3,1,1 -> 2 + 5 = 7 bits.
  # Tables: 8 bits × (32 + 3) symbols.
  assert r.huffman_bits == 8 + 7 + 8 * 35 + 96 + 6


def test_csr_bits_by_hand_two_rows_and_exact_span():
  # Two output units. Unit 0: non-zeros at 0 and 32 (gap 32 = 2^5 fits, no filler);
  # unit 1: a non-zero at 33 only (gap 34: one filler). K = 2 ({0, 1}), 1 bit per index.
  w = np.zeros((34, 2), np.float32)
  w[[0, 32], 0] = 1.0
  w[33, 1] = 1.0
  r = ss.compression_report(ss.quantize({"w": jnp.asarray(w)}, None)).leaves[0]
  assert (r.nonzeros, r.fillers) == (3, 1)
  assert r.csr_bits == 4 * (5 + 1) + 2 * 32 + 3 * math.ceil(math.log2(5))


def test_csr_bits_by_hand_conv_kernel():
  # A (2, 2, 80, 2) conv kernel: rows = the 2 output channels, 320 columns in
  # C order of (kh, kw, in). Channel 0 has non-zeros at columns 0 and 300
  # (gap 300 > 2^8 = 256: one filler); channel 1 none. K = 2.
  w = np.zeros((2, 2, 80, 2), np.float32)
  w[0, 0, 0, 0] = 0.25
  w[1, 1, 60, 0] = 0.25  # column 1·160 + 1·80 + 60 = 300
  r = ss.compression_report(ss.quantize({"k": jnp.asarray(w)}, None)).leaves[0]
  assert (r.kind, r.nonzeros, r.fillers, r.codebook) == ("conv", 2, 1, 2)
  assert r.csr_bits == 3 * (8 + 1) + 2 * 32 + 3 * math.ceil(math.log2(4))


def test_report_totals_kept_leaves_and_table():
  p = params(7)
  q = ss.quantize(p, mixture([0.0, -0.4, 0.4], [0.1, 0.2, 0.2], [0.5, 0.25, 0.25], True))
  rep = ss.compression_report(q)
  by_path = {r.path: r for r in rep.leaves}
  bias = by_path["dense/bias"]
  assert bias.kind == "kept" and bias.csr_bits == bias.dense_bits == 7 * 32
  assert rep.total.weights == 30 * 7 + 7 + 72
  assert rep.total.csr_bits == sum(r.csr_bits for r in rep.leaves)
  assert rep.ratio == pytest.approx(rep.total.dense_bits / rep.total.csr_bits)
  text = str(rep)
  assert "dense/kernel" in text and "conv/kernel" in text and "total" in text
  d = rep.to_dict()
  assert d["total"]["ratio"] == pytest.approx(rep.ratio) and d["file_bytes"] is None
  hashed = ss.compression_report(ss.hash_clusters(p, 5, key=jax.random.key(0)))
  assert {r.path: r.csr_bits for r in hashed.leaves}["conv/kernel"] == 5 * 32 + 32


@pytest.mark.parametrize("counts,want", [([5], 5), ([1, 1], 2), ([1, 1, 2, 4], 14), ([3, 3, 3, 3], 24),
                                         ([0, 7, 0], 7)])
def test_huffman_bits(counts, want):
  assert report.huffman_bits(np.array(counts)) == want


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(st.lists(st.integers(1, 1000), min_size=2, max_size=12))
def test_huffman_is_between_entropy_and_entropy_plus_one(counts):
  c = np.array(counts, np.float64)
  entropy = -np.sum(c * np.log2(c / c.sum()))
  bits = report.huffman_bits(np.array(counts))
  assert entropy - 1e-9 <= bits <= entropy + c.sum()


# ----------------------------------------------------------------------------
# Files.


def quantized_examples():
  p = params(8)
  m = mixture([0.0, -0.5, -0.1, 0.2, 0.6], [0.05, 0.1, 0.1, 0.1, 0.1], [0.4, 0.15, 0.15, 0.15, 0.15], True)
  return {
      "mixture": ss.quantize(p, m),
      "kmeans-2bit": ss.cluster_weights(p, 4, key=jax.random.key(0)),
      "kmeans-4bit": ss.cluster_weights(p, 16, key=jax.random.key(0), prune_fraction=0.5),
      "kmeans-8bit": ss.cluster_weights(p, 100, key=jax.random.key(0)),
      "hashed": ss.hash_clusters(p, 12, key=jax.random.key(0)),
      "bf16": ss.quantize(params(8, jnp.bfloat16), m),
  }


@pytest.mark.parametrize("name", list(quantized_examples()))
def test_save_load_round_trip_is_bit_identical(tmp_path, name):
  q = quantized_examples()[name]
  path = tmp_path / "model.safetensors"
  ss.save_quantized(path, q)
  loaded = ss.load_quantized(path)
  assert_quantized_equal(loaded, q)
  before, after = ss.dequantize(q), ss.dequantize(loaded)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  rep = ss.compression_report(loaded, path=path)
  assert rep.file_bytes == os.path.getsize(path) >= rep.total.packed_bits / 8
  assert rep.file_ratio == pytest.approx(rep.total.dense_bits / 8 / rep.file_bytes)
  assert "file:" in str(rep)
  assert [p for p in os.listdir(tmp_path)] == ["model.safetensors"]  # no temp file left behind


def test_load_into_the_structure_of_a_flax_model(tmp_path):
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
  variables = model.init(jax.random.key(0), jnp.ones((1, 5)))
  q = ss.cluster_weights(variables, 4, key=jax.random.key(1))
  ss.save_quantized(tmp_path / "m.safetensors", q)
  loaded = ss.load_quantized(tmp_path / "m.safetensors", like=variables)
  assert_quantized_equal(loaded, q)
  out = model.apply(ss.dequantize(loaded), jnp.ones((2, 5)))
  np.testing.assert_array_equal(out, model.apply(ss.dequantize(q), jnp.ones((2, 5))))
  plain = ss.load_quantized(tmp_path / "m.safetensors")
  assert set(plain.tree["params"]) == {"layers_0", "layers_2"}
  with pytest.raises(ValueError, match="like"):
    ss.load_quantized(tmp_path / "m.safetensors", like={"other": jnp.ones(2)})


def test_hashed_file_stores_no_indices(tmp_path):
  from safetensors.numpy import load_file
  p = {"w": jnp.ones((100, 100))}
  ss.save_quantized(tmp_path / "h.safetensors", ss.hash_clusters(p, 16, key=jax.random.key(0)))
  assert sorted(load_file(tmp_path / "h.safetensors")) == ["0/codebook"]
  assert os.path.getsize(tmp_path / "h.safetensors") < 1000  # vs 40 kB of float32


def test_truncated_corrupted_and_foreign_files_raise(tmp_path):
  from safetensors.numpy import save_file
  q = quantized_examples()["mixture"]
  path = tmp_path / "m.safetensors"
  ss.save_quantized(path, q)
  data = path.read_bytes()
  header_end = 8 + int.from_bytes(data[:8], "little")
  cases = {
      "empty": b"",
      "short": data[:5],
      "truncated header": data[: header_end - 10],
      "truncated data": data[:-7],
      "flipped data byte": data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:],
      "broken header": data[:8] + b"{" * (header_end - 8) + data[header_end:],
  }
  for what, bad in cases.items():
    path.write_bytes(bad)
    with pytest.raises(ValueError, match="not a readable softshare_jax quantized file"):
      ss.load_quantized(path)
  save_file({"x": np.ones(3, np.float32)}, str(path))
  with pytest.raises(ValueError, match="not written by ss.save_quantized"):
    ss.load_quantized(path)
  with pytest.raises(FileNotFoundError):
    ss.load_quantized(tmp_path / "missing.safetensors")


def test_no_pickle_in_the_package():
  import pathlib
  import re
  loads = re.compile(r"import (c?pickle|dill|joblib|marshal)\b|\bpickle\.\w|allow_pickle\s*=\s*True|\beval\(")
  sources = sorted(pathlib.Path(ss.__file__).parent.rglob("*.py"))
  assert len(sources) > 10
  for source in sources:
    assert not loads.search(source.read_text()), source
  assert loads.search("x = np.load(f, allow_pickle=True)")  # the pattern does catch a load


# ----------------------------------------------------------------------------
# keep_clusters.


def mlp_loss(p, x, y):
  h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  return jnp.mean(jnp.square(h @ p["l2"]["kernel"] + p["l2"]["bias"] - y))


def mlp_problem(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(128, 10)), jnp.float32)
  y = jnp.asarray(np.sin(np.asarray(x) @ rng.normal(size=(10, 2))), jnp.float32)
  p = {"l1": {"kernel": jnp.asarray(rng.normal(0, 0.4, (10, 16)), jnp.float32), "bias": jnp.zeros(16)},
       "l2": {"kernel": jnp.asarray(rng.normal(0, 0.4, (16, 2)), jnp.float32), "bias": jnp.zeros(2)}}
  return p, x, y


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_keep_clusters_keeps_the_sharing_under_adam(reduce):
  p, x, y = mlp_problem()
  q = ss.cluster_weights(p, 6, key=jax.random.key(0), prune_fraction=0.3)
  params = ss.dequantize(q)
  before = ss.sharing_stats(params, mask=lambda t: jax.tree.map(lambda a: a.ndim == 2, t))
  tx = optax.chain(ss.keep_clusters(q, reduce=reduce), optax.adam(1e-2))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, g = jax.value_and_grad(mlp_loss)(params, x, y)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(100):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0]  # it does learn
  after = ss.sharing_stats(params, mask=lambda t: jax.tree.map(lambda a: a.ndim == 2, t))
  assert after.leaves == before.leaves  # same distinct values and zeros per kernel
  for name in ("l1", "l2"):  # each cluster is still one value, zeros included
    w = np.asarray(params[name]["kernel"]).ravel()
    idx = np.asarray(q.tree[name]["kernel"].unpacked())
    book = np.asarray(q.tree[name]["kernel"].codebook)
    for c in range(book.size):
      assert np.unique(w[idx == c]).size == 1 and (book[c] != 0 or np.all(w[idx == c] == 0))
  assert not np.allclose(params["l1"]["kernel"], ss.dequantize(q)["l1"]["kernel"])  # values moved


def test_keep_clusters_sum_is_the_gradient_of_shared_values():
  p, x, y = mlp_problem(1)
  q = ss.hash_clusters(p, 7, key=jax.random.key(2))
  params = ss.dequantize(q)
  leaf1, leaf2 = q.tree["l1"]["kernel"], q.tree["l2"]["kernel"]

  def shared_loss(books, biases):  # the hashed network written with its buckets as parameters
    w = {"l1": {"kernel": books[0][leaf1.unpacked()].reshape(leaf1.shape), "bias": biases[0]},
         "l2": {"kernel": books[1][leaf2.unpacked()].reshape(leaf2.shape), "bias": biases[1]}}
    return mlp_loss(w, x, y)

  g_books = jax.grad(shared_loss)((leaf1.codebook, leaf2.codebook), (params["l1"]["bias"], params["l2"]["bias"]))
  tx = ss.keep_clusters(q, reduce="sum")
  updates, _ = tx.update(jax.grad(mlp_loss)(params, x, y), tx.init(params))
  np.testing.assert_allclose(updates["l1"]["kernel"].ravel(), g_books[0][leaf1.unpacked()], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(updates["l2"]["kernel"].ravel(), g_books[1][leaf2.unpacked()], rtol=1e-5, atol=1e-7)
  g = jax.grad(mlp_loss)(params, x, y)
  np.testing.assert_array_equal(updates["l1"]["bias"], g["l1"]["bias"])  # not quantized: passes through


def test_keep_clusters_mean_by_hand_and_errors():
  q = ss.quantize({"w": jnp.array([[0.5, 0.0, -1.0], [0.5, -1.0, 0.5]])}, None)
  tx = ss.keep_clusters(q)
  u = {"w": jnp.array([[1.0, 5.0, 2.0], [2.0, 4.0, 6.0]])}
  out, _ = tx.update(u, tx.init(ss.dequantize(q)))
  np.testing.assert_allclose(out["w"], [[3.0, 0.0, 3.0], [3.0, 3.0, 3.0]])
  with pytest.raises(ValueError, match="reduce"):
    ss.keep_clusters(q, reduce="max")
  with pytest.raises(ValueError, match="quantized"):
    ss.keep_clusters({"w": 1})
  with pytest.raises(ValueError, match="shape"):
    tx.init({"w": jnp.ones((3, 2))})
  with pytest.raises(ValueError, match="leaves"):
    tx.init({"w": jnp.ones((2, 3)), "b": jnp.ones(2)})


def test_keep_clusters_refuses_a_state_without_its_ids():
  # Passing a quantized leaf's update through unchanged would be a silent wrong answer.
  q = ss.quantize({"w": jnp.array([[0.5, 0.0, -1.0], [0.5, -1.0, 0.5]]), "b": jnp.ones(2)}, None,
                  mask={"w": True, "b": False})
  tx = ss.keep_clusters(q)
  state = tx.init(ss.dequantize(q))
  assert set(state.ids) == {"w"} and state.ids["w"].dtype == jnp.uint8
  np.testing.assert_array_equal(state.ids["w"], [[2, 1, 0], [2, 0, 2]])  # codebook [-1, 0, 0.5]: by sorted value
  np.testing.assert_allclose(state.scales["w"], [1 / 2, 0.0, 1 / 3])  # 1/|c|, 0 for the zero cluster
  u = {"w": jnp.ones((2, 3)), "b": jnp.ones(2)}
  ids = state.ids["w"]
  for bad in ({}, None, {"w": ids.reshape(-1)}, {"w": ids.astype(jnp.float32)}, {"w": ids, "v": ids}):
    with pytest.raises(ValueError, match="keep_clusters: its state must hold the quantized leaves"):
      tx.update(u, state._replace(ids=bad))
  # A quantized leaf outside the params given to init (masked out) gets no ids: the transform never sees it.
  masked = optax.masked(tx, {"w": False, "b": True})
  m_state = masked.init(ss.dequantize(q))
  assert m_state.inner_state.ids == {}
  out, _ = masked.update(u, m_state)
  np.testing.assert_array_equal(out["w"], u["w"])


def test_keep_clusters_under_jit_with_sharded_params():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  p, x, y = mlp_problem(2)
  q = ss.cluster_weights(p, 8, key=jax.random.key(0), prune_fraction=0.2)
  params = ss.dequantize(q)
  tx = optax.chain(ss.keep_clusters(q), optax.adam(1e-2))
  g = jax.grad(mlp_loss)(params, x, y)
  ref, _ = tx.update(g, tx.init(params), params)
  mesh = Mesh(np.array(jax.devices()).reshape(-1), ("x",))
  shard = lambda a: jax.device_put(a, NamedSharding(mesh, P(None, "x") if a.ndim == 2 and a.shape[1] % 8 == 0 else P()))
  params_s, g_s = jax.tree.map(shard, params), jax.tree.map(shard, g)
  out, _ = jax.jit(tx.update)(g_s, tx.init(params_s), params_s)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def _fsdp_problem(spec):
  """A (2048, 512) leaf of 16 values (0 among them) sharded by ``spec`` on the 8-device mesh, and a gradient."""
  from jax.sharding import Mesh, NamedSharding
  assert jax.device_count() == 8, "conftest.py should force 8 CPU devices"
  rng = np.random.default_rng(11)
  w = (rng.integers(-8, 8, (2048, 512)) / 8).astype(np.float32)
  g = rng.normal(size=w.shape).astype(np.float32)
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), spec)
  return w, g, sharding


def _cluster_means(w, g):
  """NumPy float64: each weight's cluster mean of ``g`` (clusters: the distinct values of ``w``), 0 where w == 0."""
  values, idx = np.unique(w, return_inverse=True)
  idx = idx.reshape(w.shape)
  means = np.bincount(idx.ravel(), g.astype(np.float64).ravel()) / np.bincount(idx.ravel())
  return np.where(values == 0, 0.0, means)[idx]


@pytest.mark.parametrize("spec", ["cols", "rows"])
def test_keep_clusters_state_is_sharded_like_the_params(spec):
  # The state holds each leaf's cluster ids in the leaf's shape and sharding, so the
  # update reads its own block: no replicated unpacked copy of the indices per device.
  from jax.sharding import PartitionSpec as P
  from test_prox_spmd import MiB, big_collectives
  w, g, sharding = _fsdp_problem(P(None, "x") if spec == "cols" else P("x", None))
  q = ss.quantize({"w": jnp.asarray(w)}, None)
  assert q.tree["w"].codebook.size == 16
  tx = optax.chain(ss.keep_clusters(q), optax.adam(1e-2))
  params = {"w": jax.device_put(w, sharding)}
  grads = {"w": jax.device_put(g, sharding)}
  state = jax.jit(tx.init)(params)
  ids = state[0].ids["w"]
  assert ids.shape == w.shape and ids.dtype == jnp.uint8
  assert ids.sharding.is_equivalent_to(sharding, 2), ids.sharding
  np.testing.assert_array_equal(np.asarray(ids), np.unique(w, return_inverse=True)[1].reshape(w.shape))
  eager = tx.init(params)[0]  # concrete params: ids put shard by shard, factors replicated
  assert eager.ids["w"].sharding.is_equivalent_to(sharding, 2) and eager.scales["w"].sharding.is_fully_replicated

  update = jax.jit(tx.update)
  compiled = update.lower(grads, state, params).compile()
  big = big_collectives(compiled.as_text(), w.size, kinds=("all-gather", "all-to-all"))
  assert not big, "\n".join(c[2] for c in big)
  device_params = w.nbytes / jax.device_count()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= 4 * device_params + 16 * MiB, f"{temp / MiB:.1f} MiB of temporaries"
  # Tighter than the bound above at this size: no more scratch than the same update of one device's block.
  block = {"w": jnp.asarray(np.asarray(params["w"].addressable_shards[0].data))}
  tx_block = optax.chain(ss.keep_clusters(ss.quantize(block, None)), optax.adam(1e-2))
  local = jax.jit(tx_block.update).lower(block, tx_block.init(block), block).compile()
  local_temp = local.memory_analysis().temp_size_in_bytes
  assert temp <= 1.25 * local_temp + MiB, (temp / MiB, local_temp / MiB)

  out, new_state = compiled(grads, state, params)
  assert out["w"].sharding.is_equivalent_to(sharding, 2)
  assert new_state[0].ids["w"].sharding.is_equivalent_to(sharding, 2)
  mean = _cluster_means(w, g)
  # Adam's first step on the cluster means: m̂ = A, v̂ = A².
  np.testing.assert_allclose(np.asarray(out["w"]), -1e-2 * mean / (np.abs(mean) + 1e-8), rtol=1e-5, atol=1e-8)
  kept, _ = jax.jit(ss.keep_clusters(q).update)(grads, ss.keep_clusters(q).init(params), params)
  np.testing.assert_allclose(np.asarray(kept["w"]), mean, rtol=1e-5, atol=1e-7)
