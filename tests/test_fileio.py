"""Tests of the quantized file's checks and of atomic saving.

The reference for the checksum is the format as documented in
``save_quantized``, written out again here; a file is edited as an attacker
would (and, where said, with the checksum recomputed, so that the schema
checks must hold on their own). Saving is checked against the filesystem:
links, permission bits, leftovers of a process killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import softshare_jax as ss
from softshare_jax import files
from test_compress import assert_quantized_equal
from test_compress import quantized_examples

BAD = "not a readable softshare_jax quantized file"


@contextlib.contextmanager
def file_error(why: str):
  """Expects a QuantizedFileError whose reason (the message after the path) matches ``why``."""
  with pytest.raises(ss.QuantizedFileError) as info:
    yield
  reason = str(info.value).split(f" is {BAD}: ", 1)[1]
  assert re.search(why, reason), reason


# ----------------------------------------------------------------------------
# Files as data: split, edit, put back together.


def split(data: bytes) -> tuple[dict, dict, bytes]:
  n = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + n])
  return header, json.loads(header["__metadata__"]["softshare_jax"]), data[8 + n:]


def reference_digest(info: dict, header: dict, body: bytes) -> str:
  """The checksum as save_quantized's docstring defines it."""
  h = hashlib.sha256()

  def part(b: bytes) -> None:
    h.update(len(b).to_bytes(8, "little") + b)

  part(json.dumps({k: v for k, v in info.items() if k != "sha256"}, sort_keys=True, separators=(",", ":")).encode())
  for name in sorted(k for k in header if k != "__metadata__"):
    t = header[name]
    part(json.dumps([name, t["dtype"], t["shape"]], separators=(",", ":")).encode())
    part(body[t["data_offsets"][0]:t["data_offsets"][1]])
  return h.hexdigest()


def assemble(header: dict, info: dict | str, body: bytes, redigest: bool = False) -> bytes:
  if redigest:
    info = {**info, "sha256": reference_digest(info, header, body)}
  header = {**header, "__metadata__": {"softshare_jax": info if isinstance(info, str) else json.dumps(info)}}
  text = json.dumps(header).encode()
  return len(text).to_bytes(8, "little") + text + body


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (Quantized, file bytes) for the examples of test_compress."""
  out, folder = {}, tmp_path_factory.mktemp("saved")
  for name, q in quantized_examples().items():
    ss.save_quantized(folder / name, q)
    out[name] = (q, (folder / name).read_bytes())
  return out


def load_bytes(tmp_path, data: bytes):
  path = tmp_path / "edited.safetensors"
  path.write_bytes(data)
  return ss.load_quantized(path)


def leaf_index(info: dict, kind: str, path: list[str] | None = None) -> int:
  return next(i for i, e in enumerate(info["leaves"]) if e["kind"] == kind and (path is None or e["path"] == path))


# ----------------------------------------------------------------------------
# The checksum covers the metadata.


@pytest.mark.parametrize("name", ["mixture", "hashed", "bf16"])
def test_checksum_is_the_documented_one(saved, name):
  header, info, body = split(saved[name][1])
  assert info["version"] == 3
  assert info["sha256"] == reference_digest(info, header, body)


def edit_seed_digit(info):
  e = info["leaves"][leaf_index(info, "hashed")]
  e["hash_seed"] = e["hash_seed"] ^ 1


def edit_reshape(info):
  e = info["leaves"][leaf_index(info, "hashed", ["dense", "kernel"])]
  e["shape"] = e["shape"][::-1]


def edit_drop_all(info):
  info["leaves"] = []


def edit_duplicate_path(info):
  info["leaves"][1]["path"] = info["leaves"][0]["path"]


def edit_array_dtype(info):
  info["leaves"][leaf_index(info, "array")]["dtype"] = "int32"


def edit_kind(info):
  e = info["leaves"][leaf_index(info, "hashed")]
  del e["hash_seed"]
  e["kind"] = "quantized"


EDITS = {"seed": edit_seed_digit, "reshape": edit_reshape, "drop leaves": edit_drop_all,
         "duplicate path": edit_duplicate_path, "array dtype": edit_array_dtype, "kind": edit_kind}


@pytest.mark.parametrize("edit", list(EDITS))
def test_metadata_edits_raise(saved, tmp_path, edit):
  """Edits the old format loaded silently; those that keep the schema can only fail the checksum."""
  header, info, body = split(saved["hashed"][1])
  EDITS[edit](info)
  with file_error("checksum does not match" if edit in ("seed", "reshape") else ""):
    load_bytes(tmp_path, assemble(header, info, body))


def test_changed_seed_digit_alone_is_caught(saved, tmp_path):
  """The file as a text editor leaves it: one digit of the seed, nothing else."""
  data = saved["hashed"][1]
  _, info, _ = split(data)
  seed = str(info["leaves"][leaf_index(info, "hashed")]["hash_seed"]).encode()
  at = data.index(b'"hash_seed\\": ' + seed) + len(b'"hash_seed\\": ')
  last = seed[-1:]
  edited = data[:at + len(seed) - 1] + (b"1" if last != b"1" else b"2") + data[at + len(seed):]
  with file_error("checksum"):
    load_bytes(tmp_path, edited)


# ----------------------------------------------------------------------------
# The schema holds even when the checksum is recomputed.


def on(kind, path=None):
  """An edit of one leaf entry (the first of that kind, or the one at path)."""
  def wrap(fn):
    def edit(info):
      fn(info["leaves"][leaf_index(info, kind, path)])
    return edit
  return wrap


SCHEMA = {
    "no leaves": (lambda i: i.update(leaves=[]), "belongs to no leaf"),
    "leaf without tensors": (lambda i: i["leaves"].append(dict(i["leaves"][0])), "has no tensor"),
    "repeated path": (lambda i: i["leaves"][1].update(path=i["leaves"][0]["path"]), "repeat"),
    "nested path": (lambda i: i["leaves"][1].update(path=i["leaves"][0]["path"] + ["x"]), "overlap"),
    "empty path among others": (lambda i: i["leaves"][0].update(path=[]), "overlap"),
    "path not strings": (lambda i: i["leaves"][0].update(path=[1]), "not a list of strings"),
    "array dtype": (on("array")(lambda e: e.update(dtype="int32")), "stored as"),
    "array reshape": (on("array")(lambda e: e.update(shape=[1] + e["shape"])), "stored as"),
    "quantized size": (on("quantized")(lambda e: e.update(shape=[e["shape"][0] + 1] + e["shape"][1:])),
                       "indices are"),
    "kind to array": (on("quantized")(lambda e: (e.pop("bits"), e.pop("axis"), e.update(kind="array"))),
                      "belongs to no leaf"),
    "kind unknown": (on("quantized")(lambda e: e.update(kind="pickle")), "kind 'pickle'"),
    "kind a list": (on("quantized")(lambda e: e.update(kind=["quantized"])), "kind"),
    "kind an object": (on("quantized")(lambda e: e.update(kind={"a": 1})), "kind"),
    "extra key": (on("quantized")(lambda e: e.update(hash_seed=None)), "has keys"),
    "missing key": (on("quantized")(lambda e: e.pop("dtype")), "has keys"),
    "bits": (on("quantized")(lambda e: e.update(bits=8)), "-bit indices"),
    "bits odd": (on("quantized")(lambda e: e.update(bits=9)), "not one of"),
    "bits bool": (on("quantized")(lambda e: e.update(bits=True)), "not one of"),
    "dtype foreign": (on("quantized")(lambda e: e.update(dtype="object")), "dtype 'object'"),
    "dtype not a string": (on("quantized")(lambda e: e.update(dtype=["float32"])), "dtype"),
    "shape negative": (on("quantized")(lambda e: e.update(shape=[-30, -7])), "not an integer in"),
    "shape bool": (on("quantized")(lambda e: e.update(shape=[True, 7])), "not an integer in"),
    "shape rank": (on("quantized")(lambda e: e.update(shape=[1] * 33)), "at most 32"),
    "shape huge": (on("quantized")(lambda e: e.update(shape=[10**40, 0])), "not an integer in"),
    "shape product": (on("quantized")(lambda e: e.update(shape=[2**30, 2**30, 0])), "more than"),
    "shape string": (on("quantized")(lambda e: e.update(shape="30,7")), "not a list"),
    "version 1": (lambda i: i.update(version=1), "version 1"),
    "version 4": (lambda i: i.update(version=4), "version 4"),
    "version true": (lambda i: i.update(version=True), "version True"),
    "format": (lambda i: i.update(format="pickle"), "unknown format"),
    "extra top key": (lambda i: i.update(note="hi"), "has keys"),
    "leaves not a list": (lambda i: i.update(leaves={}), "not a list"),
}
HASHED = {
    "seed negative": (on("hashed")(lambda e: e.update(hash_seed=-1)), "hash_seed"),
    "seed too big": (on("hashed")(lambda e: e.update(hash_seed=2**32)), "hash_seed"),
    "seed string": (on("hashed")(lambda e: e.update(hash_seed="12")), "hash_seed"),
    "seed null": (on("hashed")(lambda e: e.update(hash_seed=None)), "hash_seed"),
    "hashed bits": (on("hashed")(lambda e: e.update(bits=2)), "-bit indices"),
    "hashed huge": (on("hashed")(lambda e: e.update(shape=[2**33])), "hash covers"),
}


@pytest.mark.parametrize("case", list(SCHEMA) + list(HASHED))
def test_schema_violations_raise_even_with_a_valid_checksum(saved, tmp_path, case):
  edit, message = {**SCHEMA, **HASHED}[case]
  header, info, body = split(saved["hashed" if case in HASHED else "mixture"][1])
  edit(info)
  with file_error(message):
    load_bytes(tmp_path, assemble(header, info, body, redigest=True))


def raw_metadata_cases(info: dict) -> dict[str, tuple[str, str]]:
  text = json.dumps(info)
  return {
      "duplicate key": (text.replace('"version": 3', '"version": 3, "version": 3', 1), "duplicate key"),
      "NaN": (text.replace('"version": 3', '"version": NaN'), "not valid JSON"),
      "float": (text.replace('"version": 3', '"version": 2.0'), "not valid JSON"),
      "5000 digits": (text.replace('"version": 3', '"version": ' + "9" * 5000), "not valid JSON"),
      "deep nesting": (text.replace('"version": 3', '"version": ' + "[" * 100_000 + "]" * 100_000),
                       "not valid JSON"),
      "not an object": ("[1, 2]", "unknown format"),
  }


@pytest.mark.parametrize("case", ["duplicate key", "NaN", "float", "5000 digits", "deep nesting", "not an object"])
def test_json_hazards_raise_the_file_error(saved, tmp_path, case):
  header, info, body = split(saved["mixture"][1])
  text, message = raw_metadata_cases(info)[case]
  with file_error(message):
    load_bytes(tmp_path, assemble(header, text, body))


@pytest.mark.parametrize("depth", [100, 300, 600, 800, 900, 950, 990, 1000, 2000])
def test_deeply_nested_values_raise_the_file_error(saved, tmp_path, depth):
  """Deep enough to fail the parse, or to parse and then fail a repr in the message: one error type."""
  header, info, body = split(saved["mixture"][1])
  info["leaves"][0]["kind"] = "@deep@"
  text = json.dumps(info).replace('"@deep@"', "[" * depth + "]" * depth)
  with file_error(""):
    load_bytes(tmp_path, assemble(header, text, body))


def tensor_table_cases(header: dict, body: bytes) -> dict[str, tuple[dict, bytes, str]]:
  names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
  first, second = names[0], names[1]

  def with_entry(name, **changes):
    return {**header, name: {**header[name], **changes}}

  b0, e0 = header[first]["data_offsets"]
  return {
      "float8 tensor": (with_entry(first, dtype="F8_E4M3"), body, "dtype 'F8_E4M3'"),
      "dtype a list": (with_entry(first, dtype=["F32"]), body, "dtype"),
      "offsets size": (with_entry(first, data_offsets=[b0, e0 + 1]), body, "spans bytes"),
      "gap": (with_entry(second, data_offsets=[e0 + 4, header[second]["data_offsets"][1] + 4]),
              body + bytes(4), "gap"),
      "overlap": (with_entry(second, data_offsets=[e0 - 4, header[second]["data_offsets"][1] - 4]),
                  body, "overlap"),
      "trailing bytes": (header, body + b"\0", "trailing bytes"),
      "truncated": (header, body[:-1], "truncated"),
      "extra entry key": (with_entry(first, extra=1), body, "is not dtype, shape and data_offsets"),
      "extra tensor": ({**header, "9/value": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}, body,
                       "belongs to no leaf"),
  }


@pytest.mark.parametrize("case", ["float8 tensor", "dtype a list", "offsets size", "gap", "overlap", "trailing bytes",
                                  "truncated", "extra entry key", "extra tensor"])
def test_tensor_table_violations_raise(saved, tmp_path, case):
  header, info, body = split(saved["mixture"][1])
  header, body, message = tensor_table_cases(header, body)[case]
  with file_error(message):
    load_bytes(tmp_path, assemble(header, info, body, redigest=True))


def test_extra_safetensors_metadata_raises(saved, tmp_path):
  data = saved["mixture"][1]
  n = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + n])
  header["__metadata__"]["other"] = "x"
  text = json.dumps(header).encode()
  with file_error("not one 'softshare_jax' string"):
    load_bytes(tmp_path, len(text).to_bytes(8, "little") + text + data[8 + n:])


def edit_tensor(header: dict, body: bytes, name: str, fn) -> bytes:
  b, e = header[name]["data_offsets"]
  return body[:b] + fn(bytearray(body[b:e])) + body[e:]


def test_tensor_contents_are_checked_after_a_valid_checksum(saved, tmp_path):
  header, info, body = split(saved["mixture"][1])
  i = leaf_index(info, "quantized", ["dense", "kernel"])
  assert info["leaves"][i]["bits"] == 3 and 30 * 7 * 3 % 8 == 6  # a 3-bit stream: byte 3 holds parts of 3 indices

  def nan(b):
    b[0:4] = np.float32(np.nan).tobytes()
    return bytes(b)

  def past_codebook(b):
    b[3] = 0xF0 | (b[3] & 0x0F)  # index 9 (bits 27-29) becomes >= 6 with a codebook of at most 5
    return bytes(b)

  for name, fn, message in [(f"{i}/codebook", nan, "non-finite"), (f"{i}/indices", past_codebook, "past its codebook")]:
    with file_error(message):
      load_bytes(tmp_path, assemble(header, info, edit_tensor(header, body, name, fn), redigest=True))


def test_padding_bits_and_bool_bytes_are_checked(tmp_path):
  q = ss.Quantized({"w": ss.cluster_weights({"w": jnp.arange(15.0).reshape(3, 5)}, 4,
                                            key=jax.random.key(0)).tree["w"],
                    "b": jnp.array([True, False])})
  ss.save_quantized(tmp_path / "q", q)
  header, info, body = split((tmp_path / "q").read_bytes())
  w, b = leaf_index(info, "quantized"), leaf_index(info, "array")
  assert info["leaves"][w]["bits"] == 2  # 15 2-bit indices: the last byte holds 3 and 2 bits of padding

  def pad(x):
    x[-1] |= 0xC0
    return bytes(x)

  def two(x):
    x[0] = 2
    return bytes(x)

  for name, fn, message in [(f"{w}/indices", pad, "padding"), (f"{b}/value", two, "bool")]:
    with file_error(message):
      load_bytes(tmp_path, assemble(header, info, edit_tensor(header, body, name, fn), redigest=True))


def test_version_1_file_is_refused(tmp_path):
  from safetensors.numpy import save_file
  info = {"format": "softshare_jax.quantized", "version": 1, "sha256": "0" * 64,
          "leaves": [{"path": ["w"], "kind": "hashed", "shape": [4], "dtype": "float32", "bits": 2, "hash_seed": 3}]}
  save_file({"0/codebook": np.ones(2, np.float32)}, str(tmp_path / "v1"), metadata={"softshare_jax": json.dumps(info)})
  with file_error("version 1, whose checksum does not cover its metadata"):
    ss.load_quantized(tmp_path / "v1")


def test_a_foreign_file_is_refused_before_its_data_is_read(tmp_path):
  from safetensors.numpy import save_file
  save_file({"x": np.zeros(5_000_000, np.float32)}, str(tmp_path / "big"))  # 20 MB, no softshare_jax metadata
  tracemalloc.start()
  try:
    with file_error("not written by ss.save_quantized"):
      ss.load_quantized(tmp_path / "big")
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 1_000_000


# ----------------------------------------------------------------------------
# What save_quantized writes, load_quantized reads; what it would refuse, save refuses.


def odd_trees():
  return {
      "scalar and bool": ss.Quantized({"s": jnp.float32(2.5), "b": jnp.array([True, False]),
                                       "i": jnp.arange(3, dtype=jnp.int8)}),
      "empty leaf": ss.Quantized({"e": jnp.zeros((0, 3)), "w": jnp.ones((2, 2))}),
      "float8 and complex": ss.Quantized({"f8": jnp.array([0.5, -2.0], ml_dtypes.float8_e4m3fn),
                                          "c": jnp.array([1 + 2j], jnp.complex64)}),
      "one leaf": ss.quantize(jnp.array([[0.5, 0.0], [0.5, -0.5]]), None),
      "empty tree": ss.Quantized({}),
      "list": ss.Quantized([jnp.ones(2), {"a": jnp.zeros(1)}]),
      "int64 without x64": ss.Quantized({"n": np.array([2**40 + 1, -3], np.int64)}),  # comes back as NumPy
  }


@pytest.mark.parametrize("name", list(odd_trees()))
def test_odd_trees_round_trip(tmp_path, name):
  q = odd_trees()[name]
  ss.save_quantized(tmp_path / "q", q)
  assert_quantized_equal(ss.load_quantized(tmp_path / "q", like=q), q)
  if name == "one leaf":  # the root's path is empty: the tree is the leaf
    assert_quantized_equal(ss.load_quantized(tmp_path / "q"), q)


def test_save_refuses_what_load_would_refuse(tmp_path):
  book = jnp.zeros(4, jnp.float32)
  too_many = ss.QuantizedLeaf(book, jnp.zeros(1, jnp.uint8), (2**25,), "float32", 2, 7)  # 32 Mi hashed weights
  nan_book = ss.QuantizedLeaf(jnp.array([0.0, jnp.nan]), jnp.zeros(1, jnp.uint8), (2,), "float32", 2)
  wrong_bits = ss.QuantizedLeaf(book, jnp.zeros(1, jnp.uint8), (2,), "float32", 8)
  cases = {"declare": ss.Quantized({"h": too_many}), "non-finite": ss.Quantized({"n": nan_book}),
           "bit indices": ss.Quantized({"w": wrong_bits}),
           "cannot store": ss.Quantized({"c": np.ones(2, np.complex128)})}
  for message, q in cases.items():
    with pytest.raises(ValueError, match=message):
      ss.save_quantized(tmp_path / "q", q)
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------
# Saving: links, permissions, folders, leftovers.


def small():
  return ss.quantize({"w": jnp.array([[0.5, 0.0], [0.5, -0.5]])}, None)


def test_save_through_a_symlink_writes_its_target(tmp_path):
  (tmp_path / "real").mkdir()
  target = tmp_path / "real" / "model.safetensors"
  target.write_bytes(b"old")
  link = tmp_path / "link.safetensors"
  link.symlink_to(os.path.join("real", "model.safetensors"))  # relative, as ln -s makes them
  ss.save_quantized(link, small())
  assert link.is_symlink() and os.readlink(link) == os.path.join("real", "model.safetensors")
  assert_quantized_equal(ss.load_quantized(target), small())
  dangling = tmp_path / "dangling"
  dangling.symlink_to(tmp_path / "real" / "new.safetensors")
  ss.save_quantized(dangling, small())  # open() would create the target too
  assert dangling.is_symlink() and (tmp_path / "real" / "new.safetensors").is_file()
  loop = tmp_path / "loop"
  loop.symlink_to(loop)
  with pytest.raises(OSError, match="symbolic links"):
    ss.save_quantized(loop, small())


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755])
def test_save_keeps_an_existing_files_permissions(tmp_path, mode):
  path = tmp_path / "m.safetensors"
  path.write_bytes(b"old")
  os.chmod(path, mode)
  ss.save_quantized(path, small())
  assert stat.S_IMODE(os.stat(path).st_mode) == mode


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any file")
def test_a_read_only_file_is_not_replaced(tmp_path):
  path = tmp_path / "m.safetensors"
  path.write_bytes(b"old")
  os.chmod(path, 0o444)
  with pytest.raises(PermissionError):
    ss.save_quantized(path, small())
  assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.safetensors"]


def test_a_new_file_gets_the_permissions_open_gives(tmp_path):
  with open(tmp_path / "by-open", "wb"):
    pass
  ss.save_quantized(tmp_path / "by-save", small())
  assert stat.S_IMODE(os.stat(tmp_path / "by-save").st_mode) == stat.S_IMODE(os.stat(tmp_path / "by-open").st_mode)


def test_a_missing_folder_raises_and_is_not_created(tmp_path):
  folder = tmp_path / "no" / "such"
  with pytest.raises(FileNotFoundError) as info:
    ss.save_quantized(folder / "m.safetensors", small())
  assert info.value.filename == str(folder)
  assert not (tmp_path / "no").exists()


KILLED_WRITER = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("files", sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
with files.atomic_path(sys.argv[2]) as tmp:
  with open(tmp, "wb") as f:
    f.write(b"half a file")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def temps(folder, name):
  return sorted(n for n in os.listdir(folder) if n.startswith(f".{name}.softshare-tmp-"))


def test_a_killed_saves_leftover_is_removed_by_the_next_save(tmp_path):
  target = tmp_path / "m.safetensors"
  other = tmp_path / ".other.softshare-tmp-0000"  # another target's leftover: not ours to judge here
  other.write_bytes(b"x")
  run = subprocess.run([sys.executable, "-c", KILLED_WRITER, files.__file__, str(target)], check=False)
  assert run.returncode == -signal.SIGKILL
  assert len(temps(tmp_path, "m.safetensors")) == 1 and not target.exists()
  ss.save_quantized(target, small())
  assert temps(tmp_path, "m.safetensors") == [] and other.exists()
  assert_quantized_equal(ss.load_quantized(target), small())


def test_a_temp_file_in_use_is_not_removed(tmp_path):
  import fcntl
  target = tmp_path / "m.safetensors"
  live = tmp_path / ".m.safetensors.softshare-tmp-live"
  live.write_bytes(b"")
  with open(live, "rb") as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # a writer in another process holds its temp file so
    ss.save_quantized(target, small())
    assert live.exists()
  ss.save_quantized(target, small())  # its writer is gone now
  assert not live.exists()


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
  target = tmp_path / "m.bin"
  target.write_bytes(b"old")
  with pytest.raises(RuntimeError):
    with files.atomic_path(target) as tmp:
      with open(tmp, "wb") as f:
        f.write(b"new")
      raise RuntimeError("disk full")
  assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.bin"]
