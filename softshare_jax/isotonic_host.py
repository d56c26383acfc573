"""The host kernels of the weight-sharing prox: the C extension and its NumPy/SciPy fallback.

They solve the same rows, under the same contract, as the device kernel of
:mod:`softshare_jax.isotonic` (see its docstring and docs/design.md §4.2), in
float64 on the host: :func:`prox_rows_host` calls the C kernel
(``hostprox.c``: radix or merge sort of the float keys with their indices,
then linear-time pool adjacent violators), built at install time, or, without
a compiler, :func:`prox_rows_numpy` (a NumPy sort and SciPy's
pool-adjacent-violators). Both take float32 or float64 rows and return their
dtype.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize as _sp_optimize

try:  # The C host kernel, built at install time when a compiler is there.
  from softshare_jax import hostprox as host_kernel
except ImportError:  # pragma: no cover - depends on the build.
  host_kernel = None


def _sort_keys(x: np.ndarray) -> np.ndarray:
  """uint64 keys whose order is the float order of ``x``, index in the low half.

  One SIMD sort of these keys replaces an argsort (several times faster in
  NumPy), and the sorted values decode from the keys without a gather.
  """
  bits = x.view(np.int32)
  # Negative floats: flip every bit; others: flip the sign bit.
  flip = bits >> 31
  flip |= np.int32(-(2**31))
  flip ^= bits
  keys = np.empty(x.shape, dtype=np.uint64)
  halves = keys.view(np.uint32).reshape(*x.shape, 2)  # little-endian: low, high
  halves[..., 0] = np.arange(x.shape[-1], dtype=np.uint32)
  halves[..., 1] = flip.view(np.uint32)
  return keys


def _decode(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  halves = keys.view(np.uint32).reshape(*keys.shape, 2)
  hi = halves[..., 1].view(np.int32)
  flip = hi >> 31
  np.invert(flip, out=flip)
  flip |= np.int32(-(2**31))
  flip ^= hi
  return flip.view(np.float32), halves[..., 0].astype(np.intp)


def prox_rows_host(x: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Prox of ``t · R`` on every row of ``x`` on the host (float64 inside).

  ``x`` is ``(..., d)`` float32 or float64 (other dtypes are read as float32)
  and ``t`` broadcasts to ``x.shape[:-1]``; the result has the dtype of ``x``
  and the row-by-row contract of the module. Uses the C kernel (radix sort +
  pool adjacent violators, one pass each) when it was built, else
  :func:`prox_rows_numpy`.

  Example:
    >>> import numpy as np
    >>> from softshare_jax import isotonic
    >>> isotonic.prox_rows_host(np.array([[0.0, 0.05, 1.0], [1.0, np.inf, 2.0]]), 0.1)
    array([[0.075, 0.075, 0.9  ],
           [  nan,   nan,   nan]])
  """
  if host_kernel is None:
    return prox_rows_numpy(x, t)
  x = _host_array(x)
  t = np.ascontiguousarray(np.broadcast_to(np.asarray(t, dtype=np.float64), x.shape[:-1]))
  out = np.empty_like(x)
  if x.size:
    host_kernel.prox_rows(x, t, x.shape[-1], out, x.dtype == np.float64)
  return out


def _host_array(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  return np.ascontiguousarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)


def prox_rows_numpy(x: np.ndarray, t: np.ndarray) -> np.ndarray:
  """:func:`prox_rows_host` in NumPy/SciPy: the fallback without the C kernel.

  Same contract, row by row. Each row that needs a fit gets its own call of
  SciPy's pool-adjacent-violators (about 10 µs each): stacking rows into one
  call would need lifting each above the last, which costs a row the bits of
  every row below it.

  Example:
    >>> import numpy as np
    >>> from softshare_jax import isotonic
    >>> isotonic.prox_rows_numpy(np.array([[0.0, 0.05, 1.0], [1.0, np.nan, 2.0]]), 0.1)
    array([[0.075, 0.075, 0.9  ],
           [  nan,   nan,   nan]])
  """
  x = _host_array(x)
  shape, d = x.shape, x.shape[-1]
  rows = x.reshape(math.prod(shape[:-1]), d)
  t = np.broadcast_to(np.asarray(t, dtype=np.float64), shape[:-1]).reshape(-1)
  out = np.full_like(rows, np.nan)
  with np.errstate(invalid="ignore"):
    valid = t >= 0
  keep = (t == 0) | (valid & (d == 1))
  out[keep] = rows[keep]
  work = np.flatnonzero(valid & ~keep & np.isfinite(rows).all(axis=1))
  if work.size == 0 or d == 0:
    return out.reshape(shape)
  z, perm = _sort_rows(rows[work])
  spread = z[:, -1] - z[:, 0]
  # One cluster once t >= (max − min)(d − 1)/d (docs/design.md §4.2).
  collapse = t[work] >= spread
  fit = np.repeat(z.mean(axis=1, keepdims=True), d, axis=1)
  fit[spread == 0] = z[spread == 0]  # all-equal rows keep their values
  todo = np.flatnonzero(~collapse)
  if todo.size:
    fit[todo] = _isotonic_rows(z[todo] - (t[work][todo] / (d - 1))[:, None] * np.arange(1 - d, d, 2))
  unsorted = np.empty_like(fit)
  np.put_along_axis(unsorted, perm, fit, axis=1)
  out[work] = unsorted
  return out.reshape(shape)


def _sort_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Each row sorted ascending, in float64, and the permutation that sorts it."""
  if rows.dtype == np.float32:
    keys = _sort_keys(rows)
    keys.sort(axis=-1)
    z, perm = _decode(keys)
    return z.astype(np.float64), perm
  perm = np.argsort(rows, axis=-1, kind="stable")
  return np.take_along_axis(rows, perm, axis=-1), perm


def _isotonic_rows(v: np.ndarray) -> np.ndarray:
  """The non-decreasing fit of every row of ``v`` (finite float64), one row at a time."""
  return np.stack([_sp_optimize.isotonic_regression(row).x for row in v])
