"""The compression report: Deep Compression's bit count (Han et al. 2016), per leaf.

The accounting is written out in docs/design.md §4.4 and in
:func:`compression_report`'s docstring.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from softshare_jax import masks
from softshare_jax.compress.quantized import check_quantized
from softshare_jax.compress.quantized import is_qleaf
from softshare_jax.compress.quantized import Quantized
from softshare_jax.compress.quantized import group_ids
from softshare_jax.compress.quantized import QuantizedLeaf
from softshare_jax.compress.quantized import unpack
from softshare_jax.mixture.model import check_finite_mixture

_HUFFMAN_LENGTH_BITS = 8  # a canonical Huffman table sends one code length per symbol
# Quality thresholds, from benchmarks/recipe.py (see compression_report's docstring).
RELATIVE_CHANGE_WARNING = 0.2
IDLE_SHARE = 1e-3


@dataclasses.dataclass(frozen=True)
class LeafReport:
  """The size of one leaf (or of the total) under each storage scheme, in bits.

  Attributes:
    path: the leaf's path ("total" for the sum).
    kind: ``"dense"`` or ``"conv"`` (quantized, CSR with 5- or 8-bit relative
      indices), ``"hashed"``, or ``"kept"`` (not quantized).
    weights: number of weights.
    nonzeros: weights that are not exactly 0.
    codebook: K, codebook entries (0 for kept leaves).
    fillers: filler zeros the CSR format needs.
    csr_bits: Deep Compression's CSR with fixed-width indices.
    huffman_bits: the same with Huffman-coded indices (tables included).
    packed_bits: what :func:`save_quantized` stores: the packed indices and
      the codebook (no header).
    dense_bits: the float32 baseline, 32 per weight.
    own_bits: the params' own dtype's baseline (16 per weight of a bfloat16
      leaf), what the ``*_own`` ratios compare against.
  """

  path: str
  kind: str
  weights: int
  nonzeros: int
  codebook: int
  fillers: int
  csr_bits: int
  huffman_bits: int
  packed_bits: int
  dense_bits: int
  own_bits: int = 0

  @property
  def ratio_own(self) -> float:
    """Compression ratio of the CSR format against the params' own dtype."""
    return self.own_bits / max(self.csr_bits, 1)

  @property
  def ratio_own_huffman(self) -> float:
    return self.own_bits / max(self.huffman_bits, 1)

  @property
  def ratio_own_packed(self) -> float:
    return self.own_bits / max(self.packed_bits, 1)

  @property
  def ratio(self) -> float:
    """Compression ratio of the CSR format against dense float32."""
    return self.dense_bits / max(self.csr_bits, 1)

  @property
  def ratio_huffman(self) -> float:
    return self.dense_bits / max(self.huffman_bits, 1)

  @property
  def ratio_packed(self) -> float:
    return self.dense_bits / max(self.packed_bits, 1)

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "ratio": self.ratio, "ratio_huffman": self.ratio_huffman,
            "ratio_packed": self.ratio_packed, "ratio_own": self.ratio_own,
            "ratio_own_huffman": self.ratio_own_huffman, "ratio_own_packed": self.ratio_own_packed}


@dataclasses.dataclass(frozen=True)
class LeafQuality:
  """How far quantization moved one leaf's weights (``compression_report(..., params=)``).

  Attributes:
    path: the leaf's path.
    weights: number of weights.
    relative_change: ‖w_q − w‖ / ‖w‖ over the leaf (float64; 0 when both are
      all zero, inf when only w is).
    snapped_to_zero: the share of the leaf's weights that are exactly 0
      after quantization but were not before.
  """

  path: str
  weights: int
  relative_change: float
  snapped_to_zero: float

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ComponentQuality:
  """One mixture component and the weights it holds (``compression_report(..., mixture=)``).

  Attributes:
    index: the component's index (0 is the zero component, when there is one).
    mean: its mean μ_j.
    proportion: its mixing proportion π_j.
    share: the share of the quantized weights whose value is nearest to μ_j.
    idle: ``proportion`` or ``share`` is below ``IDLE_SHARE`` (1e-3): the
      component holds almost no weight.
  """

  index: int
  mean: float
  proportion: float
  share: float
  idle: bool

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CompressionReport:
  """Per-leaf :class:`LeafReport` rows and their total; ``str()`` is a table.

  ``file_bytes`` is the size of the file that :func:`save_quantized` wrote, when
  the report was made with ``path=``. ``quality`` (with ``params=``) and
  ``components`` (with ``mixture=``) are the quality section, and
  ``warnings`` the lines it raises (see :func:`compression_report`).
  """

  leaves: tuple[LeafReport, ...]
  total: LeafReport
  file_bytes: int | None = None
  quality: tuple[LeafQuality, ...] = ()
  components: tuple[ComponentQuality, ...] = ()
  warnings: tuple[str, ...] = ()
  RELATIVE_CHANGE_WARNING: ClassVar[float] = RELATIVE_CHANGE_WARNING
  IDLE_SHARE: ClassVar[float] = IDLE_SHARE

  @property
  def ratio(self) -> float:
    return self.total.ratio

  @property
  def ratio_own(self) -> float:
    """The whole model's CSR ratio against its own dtypes (16 bits per bfloat16 weight)."""
    return self.total.ratio_own

  @property
  def file_ratio(self) -> float | None:
    """Dense float32 bytes over the file's bytes."""
    return None if not self.file_bytes else self.total.dense_bits / 8 / self.file_bytes

  def to_dict(self) -> dict:
    return {"leaves": [r.to_dict() for r in self.leaves], "total": self.total.to_dict(),
            "file_bytes": self.file_bytes, "file_ratio": self.file_ratio,
            "quality": [q.to_dict() for q in self.quality],
            "components": [c.to_dict() for c in self.components], "warnings": list(self.warnings)}

  def __str__(self) -> str:
    headers = ("leaf", "kind", "weights", "non-zero", "K", "fillers", "CSR bits", "ratio",
               "Huffman", "packed")
    rows = [(r.path, r.kind, r.weights, r.nonzeros, r.codebook, r.fillers, r.csr_bits,
             f"{r.ratio:.1f}x", f"{r.ratio_huffman:.1f}x", f"{r.ratio_packed:.1f}x")
            for r in (*self.leaves, self.total)]
    cells = [headers] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
      return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
    lines[-1:-1] = ["  ".join("-" * w for w in widths)]
    if self.total.own_bits != self.total.dense_bits:
      t = self.total
      lines.append(f"against the params' own dtypes ({t.own_bits} bits, not {t.dense_bits} of float32): "
                   f"CSR {t.ratio_own:.1f}x, Huffman {t.ratio_own_huffman:.1f}x, packed {t.ratio_own_packed:.1f}x")
    if self.file_bytes is not None:
      lines.append(f"file: {self.file_bytes} bytes, {self.file_ratio:.1f}x smaller than "
                   f"{self.total.dense_bits // 8} bytes of float32")
    if self.quality:
      lines.append(f"quality against the weights before quantization (warning above a relative change of "
                   f"{RELATIVE_CHANGE_WARNING:g}):")
      width = max(len(q.path) for q in self.quality)
      lines += [f"  {q.path:<{width}}  relative change {q.relative_change:.3f}, snapped to zero "
                f"{100 * q.snapped_to_zero:.1f}%" for q in self.quality]
    if self.components:
      idle = [c.index for c in self.components if c.idle]
      lines.append(f"mixture: {len(self.components)} components, {len(idle)} holding almost no weight "
                   f"(proportion or share of the weights < {IDLE_SHARE:g})" + (f": {idle}" if idle else ""))
    lines += [f"WARNING: {w}" for w in self.warnings]
    return "\n".join(lines)


def huffman_bits(counts: np.ndarray) -> int:
  """Bits of a Huffman code for symbols with these counts (the sum of the merge weights)."""
  heap = [int(c) for c in np.asarray(counts).ravel() if c > 0]
  if len(heap) <= 1:
    return sum(heap)  # one symbol: one bit each
  heapq.heapify(heap)
  total = 0
  while len(heap) > 1:
    merged = heapq.heappop(heap) + heapq.heappop(heap)
    total += merged
    heapq.heappush(heap, merged)
  return total


def csr_rows(shape: tuple[int, ...]) -> tuple[int, int]:
  """(rows, row length): one row per output unit, the LAST axis (Flax's kernels are (..., in, out))."""
  if len(shape) < 2:
    return 1, math.prod(shape)
  return shape[-1], math.prod(shape[:-1])


def group_entries(book: np.ndarray) -> np.ndarray:
  """Each codebook row's own entry count: K less the padding (repeats of the row's last entry)."""
  rows = book.reshape(-1, book.shape[-1])
  if rows.shape[1] == 0:
    return np.zeros(rows.shape[0], np.int64)
  differs = rows != rows[:, -1:]
  last = np.where(differs.any(axis=1), rows.shape[1] - 1 - np.argmax(differs[:, ::-1], axis=1), -1)
  return last + 2


def codebook_bits(q: QuantizedLeaf, entries: int) -> int:
  """``entries`` codebook entries at the codebook dtype's width, plus a 32-bit scale per int8 group."""
  width = 8 * np.dtype(q.codebook.dtype).itemsize
  return width * entries + (32 * q.groups if q.scale is not None else 0)


def _quantized_report(path: str, q: QuantizedLeaf) -> LeafReport:
  book = np.asarray(jax.device_get(q.codebook))
  k = int(book.shape[-1]) if book.ndim else 0
  own_bits = 8 * np.dtype(jnp.dtype(q.dtype)).itemsize * q.size
  dense_bits = 32 * q.size
  # Which entries are zero in the leaf's dtype (a small table), then one lookup per weight: no decoded copy.
  table = np.asarray(jax.device_get(q.table()))
  zero = (table.astype(np.dtype(jnp.dtype(q.dtype))) == 0).reshape(-1)
  idx = np.asarray(unpack(np.asarray(jax.device_get(q.indices)), q.bits, q.size, np))
  code = idx if q.axis is None else np.asarray(group_ids(q.shape, q.axis)).reshape(-1) * max(k, 1) + idx
  nonzero = ~zero[code] if zero.size else np.zeros(q.size, bool)
  del code
  nonzeros = int(np.count_nonzero(nonzero))
  if q.hash_seed is not None:
    bits = codebook_bits(q, book.size) + 32  # the buckets and the seed; the indices are recomputed.
    return LeafReport(path, "hashed", q.size, nonzeros, k, 0, bits, bits, bits, dense_bits, own_bits)
  own_entries = int(group_entries(book).sum()) if q.size else 0
  book_bits = codebook_bits(q, own_entries)  # every group's own entries, not the padding
  idx = idx.reshape(q.shape)
  kind = "conv" if len(q.shape) >= 3 else "dense"
  rel_bits = 8 if kind == "conv" else 5
  span = 1 << rel_bits
  rows, length = csr_rows(q.shape)
  by_row = np.moveaxis(idx.reshape(q.shape or (1,)), -1, 0).reshape(rows, length)
  r, c = np.nonzero(np.moveaxis(nonzero.reshape(q.shape or (1,)), -1, 0).reshape(rows, length))
  prev = np.where(np.r_[True, r[1:] != r[:-1]], -1, np.r_[-1, c[:-1]]) if r.size else c
  gaps = c - prev  # >= 1; the first non-zero of a row counts from column −1
  fillers_each = (gaps - 1) // span
  fillers = int(fillers_each.sum())
  entries = nonzeros + fillers
  index_bits = math.ceil(math.log2(k)) if k > 1 else 0
  pointer_bits = (rows + 1) * max(1, math.ceil(math.log2(entries + 1)))
  csr = entries * (rel_bits + index_bits) + book_bits + pointer_bits
  # Huffman: a filler is the symbol "span" (the largest gap) with a zero weight's most common index.
  rel_counts = np.bincount(gaps - fillers_each * span, minlength=span + 1)
  rel_counts[span] += fillers
  book_counts = np.bincount(by_row[r, c], minlength=k)
  if fillers:
    book_counts[int(np.argmax(np.bincount(idx.reshape(-1)[~nonzero], minlength=k)))] += fillers
  tables = _HUFFMAN_LENGTH_BITS * (span + k)
  huffman = (huffman_bits(rel_counts) + huffman_bits(book_counts) + tables + book_bits + pointer_bits)
  packed = 8 * int(np.asarray(q.indices).nbytes) + codebook_bits(q, book.size)  # the file stores the padding
  return LeafReport(path, kind, q.size, nonzeros, k, fillers, csr, huffman, packed, dense_bits, own_bits)


def _as_numbers(x) -> np.ndarray:
  """An array leaf as float64 (complex128 for complex leaves), on the host."""
  a = np.asarray(jax.device_get(x))
  return a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)


def _quality(quantized: Quantized, params) -> tuple[LeafQuality, ...]:
  """Per leaf of ``quantized``: how far its values are from the same leaf of ``params``."""
  given = dict(masks.leaves_with_paths(params))
  out = []
  for leaf_path, leaf in quantized.leaves_with_paths():
    if not is_qleaf(leaf):
      continue  # kept as they were: nothing to compare
    w = given.get(leaf_path)
    if w is None or isinstance(w, (jax.ShapeDtypeStruct, jax.core.Tracer)) or not hasattr(w, "shape"):
      raise ValueError(f"params must hold the weights before quantization, with a concrete array at every path "
                       f"of quantized; at {leaf_path!r} it holds {type(w).__name__} (its paths: {list(given)[:20]}).")
    w = _as_numbers(w)
    wq = _as_numbers(leaf.values())
    if w.shape != wq.shape:
      raise ValueError(f"params leaf {leaf_path!r} has shape {w.shape}, the quantized leaf {wq.shape}: "
                       "params must be the weights that were quantized.")
    norm, diff = float(np.linalg.norm(w)), float(np.linalg.norm(wq - w))
    if norm > 0 or math.isnan(norm):
      rel = diff / norm  # NaN weights give NaN, which warns
    else:
      rel = 0.0 if diff == 0 else math.inf
    snapped = float(np.mean((wq == 0) & (w != 0))) if w.size else 0.0
    out.append(LeafQuality(leaf_path, int(w.size), rel, snapped))
  return tuple(out)


def _components(quantized: Quantized, mixture) -> tuple[ComponentQuality, ...]:
  """Per mixture component: its proportion, and the share of quantized weights nearest to its mean."""
  check_finite_mixture(mixture)
  means = np.asarray(jax.device_get(mixture.means), np.float64)
  proportions = np.asarray(jax.device_get(mixture.weights), np.float64)
  counts, total = np.zeros(means.size), 0
  for _, leaf in quantized.leaves_with_paths():
    if not is_qleaf(leaf) or leaf.size == 0:
      continue
    book = np.asarray(jax.device_get(leaf.table()), np.float64).reshape(-1)  # every group's entries
    code = np.asarray(jax.device_get(leaf.unpacked())).astype(np.int64)
    if leaf.axis is not None:
      code += np.asarray(jax.device_get(leaf.group_ids())).reshape(-1).astype(np.int64) * leaf.entries
    per_entry = np.bincount(code, minlength=book.size)
    # After keep_clusters fine-tuning the entries have moved off the means: the nearest mean is the owner.
    nearest = np.argmin(np.abs(book[:, None] - means[None, :]), axis=1)
    counts += np.bincount(nearest, weights=per_entry, minlength=means.size)
    total += leaf.size
  shares = counts / total if total else np.full(means.size, math.nan)
  return tuple(ComponentQuality(j, float(m), float(p), float(f), bool(p < IDLE_SHARE or f < IDLE_SHARE))
               for j, (m, p, f) in enumerate(zip(means, proportions, shares)))


def _warnings(quality: tuple[LeafQuality, ...]) -> tuple[str, ...]:
  """The warning lines of the quality section."""
  # `not <=` so that a NaN change (NaN weights) warns too.
  far = sorted((q for q in quality if not q.relative_change <= RELATIVE_CHANGE_WARNING),
               key=lambda q: -q.relative_change if q.relative_change == q.relative_change else -math.inf)
  if not far:
    return ()
  shown = ", ".join(f"{q.relative_change:.2f} on {q.path}" for q in far[:5])
  more = f" and {len(far) - 5} more leaves" if len(far) > 5 else ""
  return (f"quantization moved the weights far from the trained ones: relative change {shown}{more} "
          f"(threshold {RELATIVE_CHANGE_WARNING:g}). The ratio above is not worth much if the accuracy went "
          "with them: measure ss.dequantize(quantized) before trusting it; retrain a PRETRAINED model with "
          "ss.mixture_prior first (see its docstring for the recipe).",)


def compression_report(quantized: Quantized, *, path: str | os.PathLike | None = None, params=None,
                       mixture=None) -> CompressionReport:
  """The storage a :class:`Quantized` needs, counted as Deep Compression does.

  Accounting, per quantized leaf (Han et al. 2016; Ullrich et al. 2017):

  * Layout: the leaf is a matrix with one row per output unit (its LAST axis,
    Flax's ``(..., in, out)``) and the other axes flattened in C order as the
    columns. Only non-zero weights are stored (CSR).
  * Relative column indices: 5 bits for dense leaves (ndim <= 2), 8 bits for
    convolution kernels (ndim >= 3). An entry's gap to the previous stored
    entry of its row (from column −1 at the row start) is 1..2^bits; a larger
    gap first stores ⌈gap / 2^bits⌉ − 1 filler zeros, each a full entry.
  * Codebook indices: ⌈log2 K⌉ bits per stored entry (fillers included), K
    the leaf's codebook size counting the zero entry (with grouped codebooks,
    ``axis=``, K is the largest group's).
  * Codebook: every group's own entries (its padding not counted) at the
    codebook dtype's width: 32 bits for float32, 16 for bfloat16/float16, 8
    for int8 plus a 32-bit scale per group.
  * Row pointers: rows + 1 of them, each ⌈log2(E + 1)⌉ bits, E the stored
    entries (the narrowest fixed width that can hold them).
  * Huffman variant: both index streams Huffman-coded (optimal code lengths
    from the leaf's own counts), plus a canonical code table of 8 bits per
    symbol of each alphabet (2^bits gaps and K indices).
  * Packed: the ⌈log2 K⌉-bit index stream of the file, plus the codebook as
    the file stores it (``groups × K`` entries, padding included).
  * Hashed leaves: the buckets (at the codebook dtype's width) and a 32-bit
    seed.
  * Leaves that were not quantized: their own dtype's bits per value in every
    scheme (biases stay float32).

  The baseline is 32 bits per value of every leaf, so the totals' ratio is
  the whole model's compression, kept leaves included; ``own_bits`` and the
  ``ratio_own*`` properties compare against the params' own dtypes instead
  (a bfloat16 model's 16 bits per weight).

  Quality. A ratio says nothing about what quantizing cost, so the report
  can also compare (it cannot measure accuracy: evaluate the dequantized
  model too):

  * with ``params`` (the weights before quantization, e.g. the retrained
    ones), per quantized leaf (:class:`LeafQuality`): the relative change
    ‖w_q − w‖ / ‖w‖ and the share of weights snapped to zero that were not
    zero. A relative change above ``RELATIVE_CHANGE_WARNING`` = 0.2 (or NaN)
    on any leaf adds a line to ``warnings``, printed as ``WARNING: ...``.
    The threshold sits between the models measured in
    ``benchmarks/results/recipe.json``: with the recipe of
    :func:`~softshare_jax.mixture_prior` every kernel changed by at most 0.08
    (digits MLP, 87-97 % after quantizing; LeNet-300-100 0.035, 94.3 %);
    the ruined models by 0.48-0.76 (the digits MLP trained from its
    initialization with notebook 01's old setting: 24-60 %). It catches
    ruin, not every loss: the digits MLP with compress_mnist's gradient
    setting changed by 0.08-0.11 and lost 10-29 points, unwarned. The share
    snapped to zero is not a warning: working models snapped 20-97 % of their
    weights.
  * with ``mixture`` (the mixture the weights were quantized with), per
    component (:class:`ComponentQuality`): its proportion π_j and the share
    of quantized weights whose value is nearest its mean; a component below
    ``IDLE_SHARE`` = 1e-3 in either is listed as holding almost no weight
    (a codebook entry to spare: fewer components or a larger merge
    threshold). Not a warning: 8-15 of 14-17 components were idle in every
    run of ``recipe.json``, good or bad.

  Args:
    quantized: a :class:`Quantized`.
    path: optional: a file written by :func:`save_quantized`, whose size the
      report shows.
    params: optional: the weights that were quantized (a tree with the same
      paths), for the relative change per leaf.
    mixture: optional: the :class:`~softshare_jax.Mixture` they were
      quantized with, for the idle components.

  Raises:
    ValueError: if ``params`` lacks a quantized leaf's path, holds no
      concrete array there, or one of another shape; if ``mixture`` is not
      a finite :class:`~softshare_jax.Mixture`.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> w = jnp.zeros((40, 2)).at[0, 0].set(1.0).at[39, 0].set(1.0)
    >>> r = ss.compression_report(ss.quantize({"w": w}, None)).leaves[0]
    >>> r.nonzeros, r.fillers, r.csr_bits
    (2, 1, 88)

    A quantization that snapped most of a leaf to zero:

    >>> params = {"w": jnp.array([[1.0, 0.9], [0.8, 0.1]])}
    >>> q = ss.quantize({"w": jnp.array([[1.0, 0.0], [0.0, 0.0]])}, None)
    >>> report = ss.compression_report(q, params=params)
    >>> round(report.quality[0].relative_change, 3), report.quality[0].snapped_to_zero
    (0.77, 0.75)
    >>> print(report.warnings[0][:78])
    quantization moved the weights far from the trained ones: relative change 0.77
  """
  check_quantized(quantized)
  rows = []
  for leaf_path, leaf in quantized.leaves_with_paths():
    if is_qleaf(leaf):
      rows.append(_quantized_report(leaf_path, leaf))
    else:
      a = np.asarray(jax.device_get(leaf))
      bits = a.size * a.dtype.itemsize * 8
      rows.append(LeafReport(leaf_path, "kept", a.size, int(np.count_nonzero(a)), 0, 0, bits, bits, bits,
                             32 * a.size, bits))
  sums = [sum(getattr(r, f.name) for r in rows) for f in dataclasses.fields(LeafReport)[2:]]
  total = LeafReport("total", "", *sums)
  file_bytes = None if path is None else os.path.getsize(path)
  quality = () if params is None else _quality(quantized, params)
  components = () if mixture is None else _components(quantized, mixture)
  return CompressionReport(tuple(rows), total, file_bytes, quality, components, _warnings(quality))
