"""The compression report: Deep Compression's bit count (Han et al. 2016), per leaf.

The accounting is written out in docs/design.md §4.4 and in
:func:`compression_report`'s docstring.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import os

import jax
import numpy as np

from softshare_jax.compress._format import check_quantized
from softshare_jax.compress._format import is_qleaf
from softshare_jax.compress._format import Quantized
from softshare_jax.compress._format import QuantizedLeaf

_HUFFMAN_LENGTH_BITS = 8  # a canonical Huffman table sends one code length per symbol


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
            "ratio_packed": self.ratio_packed}


@dataclasses.dataclass(frozen=True)
class CompressionReport:
  """Per-leaf :class:`LeafReport` rows and their total; ``str()`` is a table.

  ``file_bytes`` is the size of the file that :func:`save_quantized` wrote, when
  the report was made with ``path=``.
  """

  leaves: tuple[LeafReport, ...]
  total: LeafReport
  file_bytes: int | None = None

  @property
  def ratio(self) -> float:
    return self.total.ratio

  @property
  def file_ratio(self) -> float | None:
    """Dense float32 bytes over the file's bytes."""
    return None if not self.file_bytes else self.total.dense_bits / 8 / self.file_bytes

  def to_dict(self) -> dict:
    return {"leaves": [r.to_dict() for r in self.leaves], "total": self.total.to_dict(),
            "file_bytes": self.file_bytes, "file_ratio": self.file_ratio}

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
    if self.file_bytes is not None:
      lines.append(f"file: {self.file_bytes} bytes, {self.file_ratio:.1f}x smaller than "
                   f"{self.total.dense_bits // 8} bytes of float32")
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


def _quantized_report(path: str, q: QuantizedLeaf) -> LeafReport:
  book = np.asarray(q.codebook, np.float32)
  k = int(book.size)
  idx = np.asarray(q.unpacked()).reshape(q.shape)
  codebook_bits = 32 * k
  nonzeros = int(np.count_nonzero(book[idx]))
  dense_bits = 32 * q.size
  if q.hash_seed is not None:
    bits = codebook_bits + 32  # the buckets and the seed; the indices are recomputed.
    return LeafReport(path, "hashed", q.size, nonzeros, k, 0, bits, bits, bits, dense_bits)
  kind = "conv" if len(q.shape) >= 3 else "dense"
  rel_bits = 8 if kind == "conv" else 5
  span = 1 << rel_bits
  rows, length = csr_rows(q.shape)
  by_row = np.moveaxis(idx.reshape(q.shape or (1,)), -1, 0).reshape(rows, length)
  r, c = np.nonzero(book[by_row] != 0)  # row-major: sorted by row, then column
  prev = np.where(np.r_[True, r[1:] != r[:-1]], -1, np.r_[-1, c[:-1]]) if r.size else c
  gaps = c - prev  # >= 1; the first non-zero of a row counts from column −1
  fillers_each = (gaps - 1) // span
  fillers = int(fillers_each.sum())
  entries = nonzeros + fillers
  index_bits = math.ceil(math.log2(k)) if k > 1 else 0
  pointer_bits = (rows + 1) * max(1, math.ceil(math.log2(entries + 1)))
  csr = entries * (rel_bits + index_bits) + codebook_bits + pointer_bits
  # Huffman: a filler is the symbol "span" (the largest gap) with the zero entry's index.
  rel_counts = np.bincount(gaps - fillers_each * span, minlength=span + 1)
  rel_counts[span] += fillers
  book_counts = np.bincount(by_row[r, c], minlength=k)
  if fillers:
    book_counts[int(np.flatnonzero(book == 0)[0])] += fillers
  tables = _HUFFMAN_LENGTH_BITS * (span + k)
  huffman = (huffman_bits(rel_counts) + huffman_bits(book_counts) + tables + codebook_bits
             + pointer_bits)
  packed = 8 * int(np.asarray(q.indices).nbytes) + codebook_bits
  return LeafReport(path, kind, q.size, nonzeros, k, fillers, csr, huffman, packed, dense_bits)


def compression_report(quantized: Quantized, *, path: str | os.PathLike | None = None) -> CompressionReport:
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
    the leaf's codebook size counting the zero entry.
  * Codebook: 32 bits per entry.
  * Row pointers: rows + 1 of them, each ⌈log2(E + 1)⌉ bits, E the stored
    entries (the narrowest fixed width that can hold them).
  * Huffman variant: both index streams Huffman-coded (optimal code lengths
    from the leaf's own counts), plus a canonical code table of 8 bits per
    symbol of each alphabet (2^bits gaps and K indices).
  * Packed: the 2/4/8-bit indices of the file, plus the codebook.
  * Hashed leaves: the buckets (32 bits each) and a 32-bit seed.
  * Leaves that were not quantized: their own dtype's bits per value in every
    scheme (biases stay float32).

  The baseline is 32 bits per value of every leaf, so the totals' ratio is
  the whole model's compression, kept leaves included.

  Args:
    quantized: a :class:`Quantized`.
    path: optional: a file written by :func:`save_quantized`, whose size the
      report shows.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> w = jnp.zeros((40, 2)).at[0, 0].set(1.0).at[39, 0].set(1.0)
    >>> r = ss.compression_report(ss.quantize({"w": w}, None)).leaves[0]
    >>> r.nonzeros, r.fillers, r.csr_bits
    (2, 1, 88)
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
                             32 * a.size))
  sums = [sum(getattr(r, f.name) for r in rows) for f in dataclasses.fields(LeafReport)[2:]]
  total = LeafReport("total", "", *sums)
  file_bytes = None if path is None else os.path.getsize(path)
  return CompressionReport(tuple(rows), total, file_bytes)
