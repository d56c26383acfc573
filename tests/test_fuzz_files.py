"""Fuzzing load_quantized: damaged and hostile files.

Representative files (mixture, k-means at 2 and 8 bits, hashed, bfloat16 kept
leaves) are damaged by hypothesis: flipped bytes in the length, the header
JSON and the tensor data; truncation anywhere; edits of the metadata and of
the tensor table (shapes, dtypes, kinds, seeds, bits, paths, dropped and
repeated leaves, huge numbers, deep nesting, NaN); raw splices into the
header text. The property: the load raises ``ss.QuantizedFileError``, or the
damage changed nothing the file means and the tree is bit-identical to the
saved one. Never another exception, never a different tree.

With the checksum recomputed (an attacker can, so the schema must hold on its
own) a load may succeed, but only with the leaves the edited file declares;
and a hashed leaf declaring 1e8 or 1e11 weights is refused before anything is
allocated (tracemalloc's peak, not a timing).
"""

from __future__ import annotations

import copy
import json
import tracemalloc

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest

import softshare_jax as ss
from test_compress import quantized_examples
from test_fileio import assemble
from test_fileio import file_error
from test_fileio import split

NAMES = ["mixture", "kmeans-2bit", "kmeans-8bit", "hashed", "bf16"]


class Saved(tuple):
  """(name -> (the saved Quantized, the file's bytes), a folder for damaged files)."""

  def __repr__(self) -> str:  # hypothesis prints the arguments of a failing case; these are long
    return "files"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("fuzz")
  examples, out = quantized_examples(), {}
  for name in NAMES:
    ss.save_quantized(folder / name, examples[name])
    out[name] = (examples[name], (folder / name).read_bytes())
  return Saved((out, folder))


def leaves_bytes(q: ss.Quantized) -> list:
  """Every leaf as (path, static fields, dtype, shape, raw bytes): equal lists mean bit-identical trees."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(q.tree)
  return [str(treedef)] + [(jax.tree_util.keystr(p), str(x.dtype), x.shape, np.asarray(x).tobytes()) for p, x in flat]


def load_or_error(folder, data: bytes):
  """The loaded Quantized, or None for a QuantizedFileError; any other exception propagates."""
  path = folder / "damaged.safetensors"
  path.write_bytes(data)
  try:
    return ss.load_quantized(path)
  except ss.QuantizedFileError:
    return None


def assert_error_or_same(files, name: str, data: bytes) -> None:
  (q, _), folder = files[0][name], files[1]
  loaded = load_or_error(folder, data)
  hypothesis.event("refused" if loaded is None else "loaded, unchanged")  # see --hypothesis-show-statistics
  if loaded is not None:
    assert leaves_bytes(loaded) == leaves_bytes(q), "damage changed the tree without an error"


# ----------------------------------------------------------------------------
# Bytes: flips and truncation.


@hypothesis.given(st.sampled_from(NAMES), st.sampled_from(["length", "header", "data", "anywhere"]), st.data())
def test_flipped_bytes(files, name, region, data):
  raw = bytearray(files[0][name][1])
  n = int.from_bytes(raw[:8], "little")
  low, high = {"length": (0, 7), "header": (8, 7 + n), "data": (8 + n, len(raw) - 1),
               "anywhere": (0, len(raw) - 1)}[region]
  for _ in range(data.draw(st.integers(1, 4))):
    raw[data.draw(st.integers(low, high))] ^= data.draw(st.integers(1, 255))
  assert_error_or_same(files, name, bytes(raw))


@hypothesis.given(st.sampled_from(NAMES), st.data())
def test_truncated_anywhere(files, name, data):
  raw = files[0][name][1]
  assert_error_or_same(files, name, raw[:data.draw(st.integers(0, len(raw) - 1))])


TOKENS = [b"[", b"]", b"{", b"}", b'"', b",", b":", b"0", b"-1", b"1e999", b"NaN", b"null", b"true", b"9" * 40,
          b"\\u0000", b"\\", b" ", b"\t", b"\xff", b"[" * 5000]


@hypothesis.given(st.sampled_from(NAMES), st.data())
def test_raw_splices_into_the_header(files, name, data):
  raw = files[0][name][1]
  n = int.from_bytes(raw[:8], "little")
  header = raw[8:8 + n]
  start = data.draw(st.integers(0, n))
  end = data.draw(st.integers(start, min(n, start + 8)))
  splice = b"".join(data.draw(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=3)))
  header = header[:start] + splice + header[end:]
  assert_error_or_same(files, name, len(header).to_bytes(8, "little") + header + raw[8 + n:])


# ----------------------------------------------------------------------------
# Edits of the metadata and the tensor table.


DEEP, HUGE, NAN = "@deep@", "@huge@", "@nan@"  # placeholders for what json.dumps cannot write
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.sampled_from([0, 1, 2, 3, 4, 7, 8, 12, 16, 32, 2**31, 2**32, 10**8, 10**11, 2**48, 2**64]),
    st.sampled_from(["float32", "bfloat16", "int32", "uint8", "bool", "object", "F32", "U8", "BF16",
                     "quantized", "hashed", "array", "", DEEP, HUGE, NAN]),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=4),
    st.lists(st.sampled_from([-1, 0, 1, 2, 3, 7, 30, 2**32, 10**11, 2**70, True, 1.5, "7"]), max_size=4),
    st.lists(st.text(max_size=3), max_size=3),
)
LEAF_FIELDS = ["path", "kind", "shape", "dtype", "bits", "hash_seed", "other"]
TOP_FIELDS = ["format", "version", "leaves", "sha256", "other"]
TENSOR_FIELDS = ["dtype", "shape", "data_offsets", "other"]


@st.composite
def edits(draw):
  """A list of edits: ("leaf", i, field, value), ("del", i, field), ("drop"/"dup", i), ("swap", i, j),
  ("top", field, value), ("tensor", k, field, value); indices wrap around what is there."""
  one = st.one_of(
      st.tuples(st.just("leaf"), st.integers(0, 9), st.sampled_from(LEAF_FIELDS), VALUES),
      st.tuples(st.just("del"), st.integers(0, 9), st.sampled_from(LEAF_FIELDS)),
      st.tuples(st.sampled_from(["drop", "dup"]), st.integers(0, 9)),
      st.tuples(st.just("swap"), st.integers(0, 9), st.integers(0, 9)),
      st.tuples(st.just("top"), st.sampled_from(TOP_FIELDS), VALUES),
      st.tuples(st.just("tensor"), st.integers(0, 9), st.sampled_from(TENSOR_FIELDS), VALUES),
  )
  return draw(st.lists(one, min_size=1, max_size=3))


def apply_edits(header: dict, info: dict, ops: list) -> tuple[dict, dict]:
  header, info = copy.deepcopy(header), copy.deepcopy(info)
  names = sorted(k for k in header if k != "__metadata__")
  for op in ops:
    leaves = info.get("leaves")
    if op[0] == "top":
      info[op[1]] = op[2]
    elif op[0] == "tensor":
      if names:
        header[names[op[1] % len(names)]][op[2]] = op[3]
    elif not isinstance(leaves, list) or not leaves:
      continue
    elif op[0] in ("leaf", "del"):
      entry = leaves[op[1] % len(leaves)]
      if isinstance(entry, dict):  # an earlier edit may have put something else there
        if op[0] == "leaf":
          entry[op[2]] = op[3]
        else:
          entry.pop(op[2], None)
    elif op[0] == "drop":
      leaves.pop(op[1] % len(leaves))
    elif op[0] == "dup":
      leaves.append(copy.deepcopy(leaves[op[1] % len(leaves)]))
    else:
      i, j = op[1] % len(leaves), op[2] % len(leaves)
      leaves[i], leaves[j] = leaves[j], leaves[i]
  return header, info


def with_placeholders(text: str) -> str:
  return (text.replace(json.dumps(DEEP), "[" * 50_000 + "]" * 50_000).replace(json.dumps(HUGE), "9" * 5000)
          .replace(json.dumps(NAN), "NaN"))


def build(header: dict, info: dict, body: bytes) -> bytes:
  """The file with the (edited) header and metadata; placeholders become raw JSON."""
  meta = with_placeholders(json.dumps(info))
  header = {**header, "__metadata__": {"softshare_jax": meta}}
  text = with_placeholders(json.dumps(header)).encode()
  return len(text).to_bytes(8, "little") + text + body


@hypothesis.given(st.sampled_from(NAMES), edits())
def test_edits_without_the_checksum(files, name, ops):
  header, info, body = split(files[0][name][1])
  header, info = apply_edits(header, info, ops)
  assert_error_or_same(files, name, build(header, info, body))


@hypothesis.given(st.sampled_from(NAMES), edits())
def test_edits_with_a_recomputed_checksum(files, name, ops):
  """A forged file may load, but only as exactly the leaves it declares."""
  header, info, body = split(files[0][name][1])
  header, info = apply_edits(header, info, ops)
  try:
    data = assemble(header, info, body, redigest=True)
  except (TypeError, KeyError, IndexError, ValueError):  # the edit broke what the reference digest reads
    hypothesis.reject()
  loaded = load_or_error(files[1], data)
  hypothesis.event("refused" if loaded is None else "loaded")
  if loaded is None:
    return
  declared = {"/".join(e["path"]): (tuple(e["shape"]), e["dtype"]) for e in info["leaves"]}
  flat, _ = jax.tree_util.tree_flatten_with_path(ss.dequantize(loaded))
  got = {"/".join(str(k.key) for k in p): x for p, x in flat}
  assert set(got) == set(declared)
  for path, x in got.items():
    shape, dtype = declared[path]
    assert x.shape == shape and str(x.dtype) in (dtype, str(jax.dtypes.canonicalize_dtype(dtype)))


# ----------------------------------------------------------------------------
# Memory: a tiny file declaring a huge hashed leaf.


@pytest.mark.parametrize("weights,why", [(10**8, "hashed leaves declare"), (10**11, "the hash covers")])
def test_a_huge_hashed_leaf_is_refused_without_allocating(files, weights, why):
  header, info, body = split(files[0]["hashed"][1])
  i = next(i for i, e in enumerate(info["leaves"]) if e["kind"] == "hashed")
  info["leaves"][i]["shape"] = [weights]
  data = assemble(header, info, body, redigest=True)
  path = files[1] / "huge.safetensors"
  path.write_bytes(data)
  tracemalloc.start()
  try:
    with file_error(why):
      ss.load_quantized(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert len(data) < 3000 and peak < 2_000_000
