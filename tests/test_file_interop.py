"""Files other tools can read: a reference decoder with safetensors + NumPy only, BF16, version 2, Orbax.

The decoder below follows docs/file_format.md and uses nothing of
softshare_jax: if the package's loader and the specification drift apart,
the exact comparison fails.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors

import softshare_jax as ss

DATA = os.path.join(os.path.dirname(__file__), "data")
ST = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
      "U64": np.uint64, "I32": np.int32, "I64": np.int64, "F64": np.float64, "BOOL": np.bool_}


# ----------------------------------------------------------------------------
# The reference decoder (docs/file_format.md).


def read_tensors(path) -> tuple[dict, dict[str, np.ndarray]]:
  data = open(path, "rb").read()
  n = int.from_bytes(data[:8], "little")
  meta = json.loads(json.loads(data[8:8 + n])["__metadata__"]["softshare_jax"])
  tensors = {}
  for name, t in safetensors.deserialize(data):
    raw = np.frombuffer(bytes(t["data"]), np.uint8)
    if t["dtype"] == "BF16":  # 16 bits shifted into the high half of a float32
      a = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
      a = raw.view(np.dtype(ST[t["dtype"]]).newbyteorder("<"))
    tensors[name] = a.reshape(t["shape"])
  return meta, tensors


def decode_indices(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
  if bits == 0:
    return np.zeros(n, np.int64)
  if bits > 8:
    return packed.astype(np.int64)
  stream = np.unpackbits(packed, bitorder="little")[:n * bits].reshape(n, bits).astype(np.int64)
  return (stream << np.arange(bits)).sum(axis=1)


def hash_buckets(n: int, seed: int, k: int) -> np.ndarray:
  h = np.arange(n, dtype=np.uint64) * 0x9E3779B1 & 0xFFFFFFFF ^ seed
  h ^= h >> 16
  h = h * 0x85EBCA6B & 0xFFFFFFFF
  h ^= h >> 13
  h = h * 0xC2B2AE35 & 0xFFFFFFFF
  h ^= h >> 16
  return (h % k).astype(np.int64)


def reference_decode(path) -> dict[str, np.ndarray]:
  """path ("a/b") -> the dequantized tensor, in its own dtype."""
  meta, t = read_tensors(path)
  assert meta["version"] in (2, 3)
  out = {}
  for i, leaf in enumerate(meta["leaves"]):
    shape, dtype = tuple(leaf["shape"]), np.dtype(getattr(ml_dtypes, leaf["dtype"], leaf["dtype"]))
    n = int(np.prod(shape))
    if leaf["kind"] == "array":
      v = t[f"{i}/value"]
      # A BF16 tensor was decoded to float32 (exact); other dtypes are their stored bits.
      out["/".join(leaf["path"])] = v.astype(dtype) if v.dtype == np.float32 and dtype != v.dtype else v.view(dtype)
      continue
    book = t[f"{i}/codebook"].astype(np.float32)
    if f"{i}/scale" in t:
      book = book * t[f"{i}/scale"].astype(np.float32)[..., None]
    if leaf["kind"] == "hashed":
      idx = hash_buckets(n, leaf["hash_seed"], book.shape[-1])
    else:
      idx = decode_indices(t[f"{i}/indices"], leaf["bits"], n)
    axis = leaf.get("axis")
    if axis is None:
      values = book[idx]
    else:
      rest = [a for a in range(len(shape)) if a not in axis]
      coords = np.unravel_index(np.arange(n), shape)
      g = np.ravel_multi_index([coords[r] for r in rest], [shape[r] for r in rest]) if rest else 0
      values = book[g, idx]
    out["/".join(leaf["path"])] = values.astype(dtype).reshape(shape)
  return out


def flat(tree) -> dict[str, np.ndarray]:
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same(decoded: dict, params: dict):
  assert sorted(decoded) == sorted(params)
  for k, v in params.items():
    assert decoded[k].dtype == v.dtype, k
    np.testing.assert_array_equal(decoded[k].view(np.uint8), np.ascontiguousarray(v).view(np.uint8), err_msg=k)


def mixed_tree():
  rng = np.random.default_rng(0)

  def few(shape, k, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=k)[rng.integers(0, k, shape)], dtype)

  parts = {
      "one": ss.quantize({"w": few((5, 7), 1)}, None).tree["w"],  # K = 1: 1 bit
      "grouped3": ss.quantize({"w": few((40, 6), 7)}, None, axis=0).tree["w"],
      "conv": ss.quantize({"w": few((3, 3, 4, 5), 30)}, None, axis=(0, 1, 2), codebook_dtype="bfloat16").tree["w"],
      "rows16": ss.quantize({"w": few((9, 33), 200)}, None, axis=1, codebook_dtype="float16").tree["w"],
      "int8": ss.quantize({"w": few((17, 6), 5, jnp.bfloat16)}, None, axis=0, codebook_dtype="int8").tree["w"],
      "int8_whole": ss.quantize({"w": few((17, 6), 3)}, None, codebook_dtype="int8").tree["w"],
      "wide": ss.quantize({"w": few((16, 16), 256)}, None).tree["w"],
      "hashed": ss.hash_clusters({"w": jnp.asarray(rng.normal(size=(8, 9)), jnp.float32)}, 5,
                                 key=jax.random.key(1)).tree["w"],
      "hashed_wide": ss.hash_clusters({"w": jnp.asarray(rng.normal(size=(30, 20)), jnp.bfloat16)}, 300,
                                      key=jax.random.key(2)).tree["w"],
      "bias_bf16": jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16),
      "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
  }
  return ss.Quantized(parts)


def test_a_plain_safetensors_reader_decodes_every_kind_exactly(tmp_path):
  q = mixed_tree()
  assert {leaf.bits for _, leaf in q.leaves_with_paths() if isinstance(leaf, ss.QuantizedLeaf)} >= {1, 3, 5, 8, 16}
  ss.save_quantized(tmp_path / "q.safetensors", q)
  assert_same(reference_decode(tmp_path / "q.safetensors"), flat(ss.dequantize(q)))


def test_bfloat16_tensors_are_stored_as_bf16(tmp_path):
  q = mixed_tree()
  ss.save_quantized(tmp_path / "q", q)
  meta, _ = read_tensors(tmp_path / "q")
  data = (tmp_path / "q").read_bytes()
  header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
  index = {"/".join(e["path"]): i for i, e in enumerate(meta["leaves"])}
  assert header[f"{index['bias_bf16']}/value"]["dtype"] == "BF16"
  assert header[f"{index['conv']}/codebook"]["dtype"] == "BF16"
  assert header[f"{index['rows16']}/codebook"]["dtype"] == "F16"
  assert header[f"{index['int8']}/codebook"]["dtype"] == "I8"
  assert header[f"{index['int8']}/scale"] == {**header[f"{index['int8']}/scale"], "dtype": "F32", "shape": [6]}
  # A library that knows BF16 reads it as such: safe_open's "flax" view gives a bfloat16 array.
  with safetensors.safe_open(str(tmp_path / "q"), framework="flax") as f:
    got = f.get_tensor(f"{index['bias_bf16']}/value")
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got), np.asarray(q.tree["bias_bf16"]))


# ----------------------------------------------------------------------------
# Version 2 files (tests/data/quantized_v2.safetensors, written by the version 2 writer).


def test_a_version_2_file_still_loads_and_decodes():
  path = os.path.join(DATA, "quantized_v2.safetensors")
  expected = json.load(open(os.path.join(DATA, "quantized_v2.expected.json")))
  meta, _ = read_tensors(path)
  assert meta["version"] == 2
  got = flat(ss.dequantize(ss.load_quantized(path)))
  assert sorted(got) == sorted(expected)
  for k, e in expected.items():
    assert str(got[k].dtype) == e["dtype"] and list(got[k].shape) == e["shape"]
    np.testing.assert_array_equal(got[k].astype(np.float32).ravel(), np.asarray(e["values"], np.float32))
  ref = reference_decode(path)
  for k in got:
    np.testing.assert_array_equal(np.asarray(ref[k], np.float32), got[k].astype(np.float32))


def test_a_version_2_file_saved_again_is_version_3_with_the_same_weights(tmp_path):
  q = ss.load_quantized(os.path.join(DATA, "quantized_v2.safetensors"))
  ss.save_quantized(tmp_path / "v3", q)
  assert read_tensors(tmp_path / "v3")[0]["version"] == 3
  assert_same(reference_decode(tmp_path / "v3"), flat(ss.dequantize(q)))


# ----------------------------------------------------------------------------
# Orbax.


def test_orbax_checkpoint_of_a_quantized_tree(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  q = mixed_tree()
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", q)
  ckpt.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, q)
  restored = ckpt.restore(tmp_path / "ckpt", target)
  ckpt.close()
  assert jax.tree.structure(restored) == jax.tree.structure(q)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(q)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert_same(flat(ss.dequantize(restored)), flat(ss.dequantize(q)))
