"""The quantized file's layout, checked without reading its data (format versions 2 and 3).

A file is untrusted input. Its JSON header is parsed strictly; every leaf and
tensor it declares is checked against the others and against the file's own
length before anything is allocated; what is not stored (shapes, hashed
leaves) is bounded by documented limits. :func:`digest` is the SHA-256 that
covers the metadata and every tensor. Problems raise :class:`InvalidFile`,
which ``fileio`` turns into ``QuantizedFileError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Iterable, NamedTuple

import jax.numpy as jnp
import numpy as np

from softshare_jax.compress.quantized import index_bits

FORMAT = "softshare_jax.quantized"
FORMAT_VERSION = 3  # what save_quantized writes (docs/file_format.md)
READ_VERSIONS = (2, 3)  # 2: float32 (K,) codebooks, 2/4/8/16/32-bit indices, bfloat16 values as U16
METADATA_KEY = "softshare_jax"

# What a file may declare. Stored tensors are bounded by the file's length;
# these bound what is not stored: the JSON, the shapes, the hashed leaves.
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_RANK = 32
MAX_SHAPE_SIZE = 2**48  # product of a shape's nonzero dimensions
HASH_POSITIONS = 2**32  # the hash is a function of 32-bit positions
HASHED_WEIGHTS_FLOOR = 2**24
HASHED_WEIGHTS_PER_BYTE = 1024

# safetensors' dtype names for the dtypes a file stores (others travel as uints).
ST_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
              "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16", "BF16": "bfloat16",
              "F32": "float32", "F64": "float64"}
CODEBOOK_ST_DTYPES = ("F32", "BF16", "F16", "I8")  # version 3; version 2 stores F32 only
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


# The leaf dtypes a file may name: NumPy's, complex64, and the ML dtypes this JAX has.
DTYPES = tuple(n for n in (*ST_NAMES, "complex64", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                           "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz", "float8_e3m4",
                           "float8_e4m3", "float8_e8m0fnu", "float4_e2m1fn", "int4", "uint4", "int2", "uint2")
               if hasattr(jnp, n) or n in ST_NAMES or n == "complex64")
_LEAF_KEYS = {"quantized": {"path", "kind", "shape", "dtype", "bits"},
              "hashed": {"path", "kind", "shape", "dtype", "bits", "hash_seed"},
              "array": {"path", "kind", "shape", "dtype"}}
_V3_KEYS = {"quantized": {"axis"}, "hashed": {"axis"}, "array": set()}  # added in version 3
_ROLES = {"quantized": ("codebook", "indices"), "hashed": ("codebook",), "array": ("value",)}
_V2_BITS = (2, 4, 8, 16, 32)
V3_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)


def v2_index_bits(num_entries: int) -> int:
  """The index width version 2 used: 2, 4 or 8 bits, 16 or 32 past 256 entries."""
  for bits in (2, 4, 8, 16):
    if num_entries <= 1 << bits:
      return bits
  return 32


class Invalid(Exception):
  """Why a file breaks the format; the caller says whose file (or tree) it is."""


def short(x: Any, n: int = 60) -> str:
  """``x`` for a message: clipped, and safe for whatever a hostile file nests."""
  try:
    r = x if isinstance(x, BaseException) else repr(x)
  except RecursionError:
    return f"<a {type(x).__name__} nested too deep>"
  return str(r) if len(str(r)) <= n else str(r)[:n - 3] + "..."


def stored_dtype(name: str, version: int = FORMAT_VERSION) -> str:
  """The dtype a leaf of dtype ``name`` is stored as: itself, or the unsigned int of its width.

  Version 2 stored bfloat16 as uint16; version 3 as safetensors' BF16.
  """
  if name in ST_NAMES and not (version == 2 and name == "bfloat16"):
    return name
  return f"uint{np.dtype(jnp.dtype(name)).itemsize * 8}"


# ----------------------------------------------------------------------------
# The checksum.


def _canonical(obj: Any) -> bytes:
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


class DigestStream:
  """:func:`digest` fed one tensor (or one chunk of a tensor) at a time, in name order."""

  def __init__(self, meta: dict):
    self._h = hashlib.sha256()
    self._part(_canonical(meta))

  def _part(self, b: bytes) -> None:
    self._h.update(len(b).to_bytes(8, "little"))
    self._h.update(b)

  def begin(self, name: str, st_dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
    self._part(_canonical([name, st_dtype, list(shape)]))
    self._h.update(int(nbytes).to_bytes(8, "little"))

  def update(self, data: Any) -> None:
    self._h.update(data)

  def tensor(self, name: str, st_dtype: str, shape: tuple[int, ...], data: Any) -> None:
    self.begin(name, st_dtype, shape, memoryview(data).nbytes)
    self.update(data)

  def hexdigest(self) -> str:
    return self._h.hexdigest()


def digest_stream(meta: dict) -> DigestStream:
  return DigestStream(meta)


def digest(meta: dict, tensors: Iterable[tuple[str, str, tuple[int, ...], memoryview]]) -> str:
  """SHA-256 of the metadata (minus the digest) and each tensor's name, dtype, shape and bytes.

  Each part is length-prefixed, so no two files share the byte stream.
  """
  h = DigestStream(meta)
  for name, st_dtype, shape, data in sorted(tensors, key=lambda t: t[0]):
    h.tensor(name, st_dtype, shape, data)
  return h.hexdigest()


# ----------------------------------------------------------------------------
# The layout: the header and the metadata, checked without touching the data.


class Tensor(NamedTuple):
  st_dtype: str
  shape: tuple[int, ...]
  begin: int
  end: int


class Leaf(NamedTuple):
  path: tuple[str, ...]
  kind: str
  shape: tuple[int, ...]
  dtype: str
  bits: int | None
  seed: int | None
  axis: tuple[int, ...] | None = None
  version: int = FORMAT_VERSION

  @property
  def groups(self) -> int:
    return 1 if self.axis is None else math.prod(s for a, s in enumerate(self.shape) if a not in self.axis)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def name(self) -> str:
    return "/".join(self.path) or "<root>"


class Layout(NamedTuple):
  meta: dict
  sha256: str
  leaves: list[Leaf]
  tensors: dict[str, Tensor]


def _strict_json(raw: bytes | str, what: str) -> Any:
  """JSON with integers, strings, lists and objects only; no duplicate keys."""

  def pairs(items: list) -> dict:
    obj = {}
    for k, v in items:
      if k in obj:
        raise ValueError(f"duplicate key {short(k)}")
      obj[k] = v
    return obj

  def no_float(s: str) -> Any:
    raise ValueError(f"non-integer number {short(s)}")

  try:
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    return json.loads(text, object_pairs_hook=pairs, parse_float=no_float, parse_constant=no_float)
  except (ValueError, RecursionError) as e:  # RecursionError: nesting too deep.
    raise Invalid(f"its {what} is not valid JSON ({short(e, 120)}).") from None


def _int(what: str, x: Any, low: int, high: int) -> int:
  if type(x) is not int or not low <= x <= high:  # bools and floats are not ints here.
    raise Invalid(f"{what} is {short(x)}, not an integer in [{low}, {high}].")
  return x


def _shape(what: str, x: Any) -> tuple[int, ...]:
  if type(x) is not list or len(x) > MAX_RANK:
    raise Invalid(f"{what} is {short(x)}, not a list of at most {MAX_RANK} dimensions.")
  dims = tuple(_int(f"a dimension of {what}", d, 0, MAX_SHAPE_SIZE) for d in x)
  if math.prod(d for d in dims if d) > MAX_SHAPE_SIZE:
    raise Invalid(f"{what} {list(dims)} has more than {MAX_SHAPE_SIZE} elements.")
  return dims


def _tensor(name: str, x: Any) -> Tensor:
  if type(x) is not dict or set(x) != {"dtype", "shape", "data_offsets"}:
    raise Invalid(f"tensor {short(name)}'s entry {short(x)} is not dtype, shape and data_offsets.")
  if type(x["dtype"]) is not str or x["dtype"] not in ST_DTYPES:
    raise Invalid(f"tensor {short(name)} has dtype {short(x['dtype'])}; a quantized file uses "
                   f"{sorted(ST_DTYPES)}.")
  shape = _shape(f"tensor {short(name)}'s shape", x["shape"])
  offsets = x["data_offsets"]
  if type(offsets) is not list or len(offsets) != 2:
    raise Invalid(f"tensor {short(name)}'s data_offsets {short(offsets)} are not [begin, end].")
  begin, end = (_int(f"tensor {short(name)}'s data offset", o, 0, 2**63) for o in offsets)
  if end - begin != math.prod(shape) * np.dtype(ST_DTYPES[x["dtype"]]).itemsize:
    raise Invalid(f"tensor {short(name)} spans bytes [{begin}, {end}), not the size of "
                   f"{x['dtype']}{list(shape)}.")
  return Tensor(x["dtype"], shape, begin, end)


def _leaf(i: int, e: Any, version: int) -> Leaf:
  if type(e) is not dict:
    raise Invalid(f"leaf {i} is {short(e)}, not an object.")
  kind = e.get("kind")
  if type(kind) is not str or kind not in _LEAF_KEYS:
    raise Invalid(f"leaf {i} has kind {short(kind)}; the kinds are {sorted(_LEAF_KEYS)}.")
  keys = _LEAF_KEYS[kind] | (_V3_KEYS[kind] if version >= 3 else set())
  if set(e) != keys:
    raise Invalid(f"leaf {i} ({kind}) has keys {short(sorted(e))}; a {kind} leaf has exactly {sorted(keys)}.")
  path = e["path"]
  if type(path) is not list or not all(type(k) is str for k in path):
    raise Invalid(f"leaf {i}'s path {short(path)} is not a list of strings.")
  shape = _shape(f"leaf {i}'s shape", e["shape"])
  if type(e["dtype"]) is not str or e["dtype"] not in DTYPES:
    raise Invalid(f"leaf {i} has dtype {short(e['dtype'])}; a file may name {list(DTYPES)}.")
  bits = seed = axis = None
  if kind != "array":
    bits, allowed = e["bits"], (V3_BITS if version >= 3 else _V2_BITS)
    if type(bits) is not int or bits not in allowed:
      raise Invalid(f"leaf {i}'s bits are {short(bits)}, not one of {list(allowed)}.")
  if kind == "hashed":
    seed = _int(f"leaf {i}'s hash_seed", e["hash_seed"], 0, 2**32 - 1)
  if version >= 3 and kind != "array" and e["axis"] is not None:
    axis = e["axis"]
    ok = (type(axis) is list and len(axis) < len(shape) and all(type(a) is int for a in axis)
          and axis == sorted(set(axis)) and all(0 <= a < len(shape) for a in axis) and kind == "quantized")
    if not ok:
      raise Invalid(f"leaf {i}'s axis {short(axis)} is not null or a sorted list of distinct axes of its shape "
                     "(not all of them; hashed leaves have none).")
    axis = tuple(axis)
  return Leaf(tuple(path), kind, shape, e["dtype"], bits, seed, axis, version)


def _metadata(header: dict) -> tuple[dict, str, list[Leaf]]:
  meta = header.get("__metadata__")
  if type(meta) is not dict or METADATA_KEY not in meta:
    raise Invalid("no 'softshare_jax' metadata; it was not written by ss.save_quantized (a plain "
                   "safetensors checkpoint?).")
  if set(meta) != {METADATA_KEY} or type(meta[METADATA_KEY]) is not str:
    raise Invalid(f"its safetensors metadata {short(meta)} is not one 'softshare_jax' string.")
  info = _strict_json(meta[METADATA_KEY], "metadata")
  if type(info) is not dict or info.get("format") != FORMAT:
    raise Invalid(f"unknown format {short(info.get('format') if type(info) is dict else info)}.")
  version = info.get("version")
  if type(version) is int and version == 1:
    raise Invalid(f"format version 1, whose checksum does not cover its metadata, so it cannot be "
                   f"trusted; this softshare_jax reads version {FORMAT_VERSION}. Load it with the "
                   "softshare_jax that wrote it and save it again.")
  if type(version) is not int or version not in READ_VERSIONS:
    raise Invalid(f"format version {short(version)}; this softshare_jax reads versions {list(READ_VERSIONS)}.")
  if set(info) != {"format", "version", "leaves", "sha256"}:
    raise Invalid(f"its metadata has keys {short(sorted(info))}, not format, version, leaves, sha256.")
  sha = info.pop("sha256")
  if type(sha) is not str or not re.fullmatch("[0-9a-f]{64}", sha):
    raise Invalid(f"its checksum {short(sha)} is not a SHA-256 in hex.")
  if type(info["leaves"]) is not list:
    raise Invalid(f"its leaves {short(info['leaves'])} are not a list.")
  return info, sha, [_leaf(i, e, version) for i, e in enumerate(info["leaves"])]


def roles(i: int, leaf: Leaf, tensors: dict[str, Tensor]) -> tuple[str, ...]:
  """The tensor names leaf i owns: an int8 codebook brings its scale."""
  book = tensors.get(f"{i}/codebook")
  scale = ("scale",) if leaf.kind != "array" and book is not None and book.st_dtype == "I8" else ()
  return tuple(f"{i}/{r}" for r in _ROLES[leaf.kind] + scale)


def _check_tensors(leaves: list[Leaf], tensors: dict[str, Tensor]) -> None:
  """Every tensor belongs to exactly one leaf, with the dtype and shape the leaf implies."""
  want = {name: i for i, leaf in enumerate(leaves) for name in roles(i, leaf, tensors)}
  if set(tensors) != set(want):
    extra, missing = sorted(set(tensors) - set(want)), sorted(set(want) - set(tensors))
    raise Invalid(f"tensor {short(extra[0])} belongs to no leaf." if extra else
                   f"leaf {want[missing[0]]} has no tensor {missing[0]!r}.")
  for i, leaf in enumerate(leaves):
    who = f"leaf {i} ({leaf.name!r})"
    if leaf.kind == "array":
      t, stored = tensors[f"{i}/value"], stored_dtype(leaf.dtype, leaf.version)
      if (t.st_dtype, t.shape) != (ST_NAMES[stored], leaf.shape):
        raise Invalid(f"{who} is {leaf.dtype}{list(leaf.shape)}, stored as {stored}, but its tensor is "
                       f"{ST_DTYPES[t.st_dtype]}{list(t.shape)}.")
      continue
    book = tensors[f"{i}/codebook"]
    dtypes = CODEBOOK_ST_DTYPES if leaf.version >= 3 else ("F32",)
    rows = () if leaf.axis is None else (leaf.groups,)
    if book.st_dtype not in dtypes or len(book.shape) != len(rows) + 1 or book.shape[:-1] != rows:
      raise Invalid(f"{who}'s codebook is {ST_DTYPES[book.st_dtype]}{list(book.shape)}, not "
                     f"{'/'.join(ST_DTYPES[d] for d in dtypes)}{list(rows) + ['K']}.")
    if book.st_dtype == "I8" and tensors[f"{i}/scale"][:2] != ("F32", rows):
      t = tensors[f"{i}/scale"]
      raise Invalid(f"{who}'s scale is {ST_DTYPES[t.st_dtype]}{list(t.shape)}, not float32{list(rows)}.")
    k = book.shape[-1]
    if k == 0 and (leaf.size or leaf.kind == "hashed"):
      raise Invalid(f"{who} has an empty codebook.")
    need = index_bits(k) if leaf.version >= 3 else v2_index_bits(k)
    if leaf.bits != need:
      raise Invalid(f"{who} has {leaf.bits}-bit indices; a codebook of {k} needs {need}.")
    if leaf.kind == "quantized":
      t = tensors[f"{i}/indices"]
      if leaf.bits <= 8:
        want_shape, want_dtype = (-(-leaf.size * leaf.bits // 8),), "U8"
      else:
        want_shape, want_dtype = (leaf.size,), ST_NAMES[f"uint{leaf.bits}"]
      if (t.st_dtype, t.shape) != (want_dtype, want_shape):
        raise Invalid(f"{who}'s indices are {ST_DTYPES[t.st_dtype]}{list(t.shape)}, not the "
                       f"{ST_DTYPES[want_dtype]}{list(want_shape)} that hold {leaf.size} {leaf.bits}-bit indices.")


def _check_paths(leaves: list[Leaf]) -> None:
  paths = sorted(leaf.path for leaf in leaves)
  for a, b in zip(paths, paths[1:]):  # a path that extends another sorts right after it
    if b[:len(a)] == a:
      raise Invalid(f"the leaf paths {'/'.join(a)!r} and {'/'.join(b)!r} " +
                     ("repeat." if a == b else "overlap (one is inside the other)."))


def _check_hashed(leaves: list[Leaf], file_bytes: int) -> None:
  budget = max(HASHED_WEIGHTS_FLOOR, HASHED_WEIGHTS_PER_BYTE * file_bytes)
  total = 0
  for i, leaf in enumerate(leaves):
    if leaf.kind == "hashed":
      if leaf.size > HASH_POSITIONS:
        raise Invalid(f"hashed leaf {i} ({leaf.name!r}) has {leaf.size} weights; the hash covers {HASH_POSITIONS}.")
      total += leaf.size
  if total > budget:
    raise Invalid(f"its hashed leaves declare {total} weights; a file of {file_bytes} bytes may declare "
                   f"max({HASHED_WEIGHTS_FLOOR}, {HASHED_WEIGHTS_PER_BYTE} per byte) = {budget}.")


def check_layout(header_bytes: bytes, file_bytes: int) -> Layout:
  """Checks the header and the metadata against each other and the file's length; reads no data."""
  header = _strict_json(header_bytes, "header")
  if type(header) is not dict:
    raise Invalid(f"its header is {short(header)}, not a JSON object (not a safetensors file).")
  meta, sha, leaves = _metadata(header)
  tensors = {name: _tensor(name, x) for name, x in header.items() if name != "__metadata__"}
  end = 0
  for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
    if t.begin != end:
      raise Invalid(f"its tensors {'overlap' if t.begin < end else 'leave a gap'} at byte {min(t.begin, end)}.")
    end = t.end
  declared = 8 + len(header_bytes) + end
  if declared != file_bytes:
    raise Invalid(f"its header describes {declared} bytes but the file has {file_bytes} "
                   f"({'truncated' if declared > file_bytes else 'trailing bytes'}).")
  _check_tensors(leaves, tensors)
  _check_paths(leaves)
  _check_hashed(leaves, file_bytes)
  return Layout(meta, sha, leaves, tensors)
