"""Lloyd's k-means iterations in 1-D on sorted data (the k-means baseline's inner loop).

On sorted data every cluster of a 1-D k-means is a contiguous range, cut at
the midpoints between neighbouring centres, so an iteration needs only K
binary searches for the cut points and K range sums, not a pass over the n
weights: O(K log n) per iteration after an O(n) set-up. The range sums are
differences of prefix sums; a plain float64 prefix sum would lose about
eps · n · spread to cancellation (a small cluster's mean off by 1e-11 of the
weights' scale at n = 4e6), so the prefix sums are two-level (docs/design.md
§4.4): within blocks of ``_BLOCK`` weights, centred on a shift, and across
blocks in double-float (TwoSum), which bounds the error of a range sum by
eps times the range's own content plus one block's.
"""

from __future__ import annotations

import numpy as np

LLOYD_MAX_ITERATIONS = 300
_BLOCK = 256  # weights per inner prefix-sum block: a range sum is off by at most ~eps·256·max|x − shift|
_MAX_BLOCKS = 1 << 16  # the cross-block sums run in a Python loop: keep it short


class _RangeSums:
  """Sums of ``x_sorted[a:b]`` in O(1) per range after an O(n) set-up (float64, shifted)."""

  def __init__(self, x: np.ndarray):
    n = x.size
    self.shift = float(x[(n - 1) // 2]) if n else 0.0
    self.block = max(_BLOCK, -(-n // _MAX_BLOCKS))
    blocks = max(1, -(-n // self.block))
    # inner[i] = the sum of the weights of i's block before i (exclusive), so a
    # range starting at a block boundary adds nothing from inside the block.
    self.inner = np.zeros(blocks * self.block + 1)
    np.subtract(x, self.shift, out=self.inner[1:n + 1])
    rows = self.inner[1:].reshape(blocks, self.block)
    np.add.accumulate(rows, axis=1, out=rows)
    totals = rows[:, -1].tolist()
    self.inner[::self.block] = 0.0
    hi, lo = [0.0] * (blocks + 1), [0.0] * (blocks + 1)
    s = e = 0.0
    for b, t in enumerate(totals):  # TwoSum: s + e carries the block totals' sum to ~eps² relative
      u = s + t
      v = u - s
      e += (s - (u - v)) + (t - v)
      s = u
      hi[b + 1], lo[b + 1] = s, e
    self.hi, self.lo = np.array(hi), np.array(lo)

  def sums(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Σ (x − shift) over each [start, stop), float64."""
    bs, be = starts // self.block, stops // self.block
    return ((self.hi[be] - self.hi[bs]) + (self.lo[be] - self.lo[bs]) + (self.inner[stops] - self.inner[starts]))


def cluster_bounds(x_sorted: np.ndarray, centres: np.ndarray) -> np.ndarray:
  """Where each cluster ends in ``x_sorted``: ``K`` indices, the last ``len(x_sorted)``.

  Cluster j of the sorted ``centres`` is ``x_sorted[bounds[j-1]:bounds[j]]``
  (``bounds[-1]`` read as 0): the weights nearer to centre j than to its
  neighbours, a weight on a midpoint going to the lower centre (as
  ``np.searchsorted(midpoints, x)`` and ``argmin`` over distances do).

  Args:
    x_sorted: sorted 1-D weights.
    centres: K sorted centres.

  Returns:
    An int64 array of K cluster ends.

  Example:
    >>> import numpy as np
    >>> cluster_bounds(np.array([0.0, 0.5, 1.0, 2.0]), np.array([0.0, 1.0, 3.0])).tolist()
    [2, 4, 4]
  """
  c = np.asarray(centres, np.float64)
  x = np.asarray(x_sorted)
  if x.dtype != np.float64:  # compare in float64 as the reference does (exact for float32 weights)
    x = x.astype(np.float64)
  ends = np.searchsorted(x, (c[1:] + c[:-1]) / 2, side="right")
  return np.append(ends, x.size).astype(np.int64)


def lloyd_1d(x_sorted: np.ndarray, centres: np.ndarray) -> np.ndarray:
  """Lloyd's iterations in 1-D to a fixed point, in float64 on the host.

  Each weight goes to its nearest centre (cut at the midpoints between sorted
  neighbours; a weight on a midpoint goes to the lower centre), each centre
  moves to the mean of its weights (an empty cluster keeps its centre), until
  the sorted centres repeat exactly or after 300 iterations. The same
  iterations as assigning every weight with ``np.searchsorted`` and averaging
  with ``np.bincount``, in O(K log n) per iteration instead of O(n log K): the
  centres agree with that to about 1e-13 of the weights' scale.

  Args:
    x_sorted: 1-D weights sorted ascending (float32 or float64; no NaN).
    centres: the starting centres, any order.

  Returns:
    The sorted float64 centres (as many as given).

  Example:
    >>> import numpy as np
    >>> lloyd_1d(np.array([0., 0.1, 0.9, 1.0]), np.array([0.2, 0.8])).tolist()
    [0.05, 0.95]
  """
  x = np.asarray(x_sorted)
  if x.ndim != 1:
    raise ValueError(f"x_sorted must be 1-D, got shape {x.shape}.")
  if x.dtype != np.float64:
    x = x.astype(np.float64)
  c = np.sort(np.asarray(centres, np.float64).ravel())
  if c.size == 0 or x.size == 0:
    return c
  ranges = _RangeSums(x)
  starts, ends = np.zeros(c.size, np.int64), np.full(c.size, x.size, np.int64)
  for _ in range(LLOYD_MAX_ITERATIONS):
    # cluster_bounds without its checks: the cut points are K − 1 binary searches.
    cuts = np.searchsorted(x, (c[1:] + c[:-1]) / 2, side="right")
    starts[1:] = ends[:-1] = cuts
    counts = ends - starts
    means = ranges.shift + ranges.sums(starts, ends) / np.maximum(counts, 1)
    new = np.sort(np.where(counts > 0, means, c))
    if np.array_equal(new, c):
      break
    c = new
  return c


def nearest_centres(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
  """Each weight's nearest centre (ties to the lower), in ``x``'s order: O(n log K).

  Args:
    x: weights, any shape and order.
    centres: the centres, any order.

  Returns:
    An array of ``x``'s shape holding centres (float64 when the centres are).

  Example:
    >>> import numpy as np
    >>> nearest_centres(np.array([0.9, -1.0, 0.5]), np.array([1.0, 0.0])).tolist()
    [1.0, 0.0, 0.0]
  """
  c, idx = nearest_index(x, centres)
  return c[idx]


def nearest_index(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The sorted centres and each weight's index into them (nearest, ties to the lower): O(n log K).

  Example:
    >>> import numpy as np
    >>> c, i = nearest_index(np.array([0.9, -1.0, 0.5]), np.array([1.0, 0.0]))
    >>> c.tolist(), i.tolist()
    ([0.0, 1.0], [1, 0, 0])
  """
  c = np.sort(np.asarray(centres))
  if c.size == 0:
    raise ValueError("centres must not be empty.")
  return c, np.searchsorted((c[1:] + c[:-1]) / 2, x)


__all__ = ["LLOYD_MAX_ITERATIONS", "cluster_bounds", "lloyd_1d", "nearest_centres", "nearest_index"]
