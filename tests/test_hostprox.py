"""The C host kernel (hostprox.c) on long rows, in each of its sorting regimes.

Float32 rows sort by key << 32 | index in one of four ways by length: merge sort
(up to 384), LSD radix (to 6e5), top digit first then each bucket by LSD while
it is in cache (6e5 to 1.5e6), LSD radix with prefetches (beyond; the scatter
back prefetches too beyond 6e6). Every way must give the stable order of the
float keys, so the prox is the same bits whichever runs.

References, independent of the kernel: a stable ``np.argsort`` of the float keys
computed in NumPy; the kernel's arithmetic replayed in Python floats after that
sort (:func:`exact_prox_row`: IEEE float64, the same operations in the same
order, so equal bit for bit); the float64 NumPy/SciPy prox
(``prox_rows_numpy``) within rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

from softshare_jax import isotonic

needs_c = pytest.mark.skipif(isotonic.host_kernel is None, reason="the C host kernel is not built")

# hostprox.c's MSD_ROW, PREFETCH_ROW and SCATTER_PREFETCH_ROW: the lengths
# where the float32 sort changes its way, tested on both sides.
MSD_ROW, PREFETCH_ROW, SCATTER_PREFETCH_ROW = 600_000, 1_500_000, 6_000_000


def float_keys(x: np.ndarray) -> np.ndarray:
  """Unsigned keys whose order is the float order: negatives flip every bit, others the sign bit."""
  bits = x.view(np.uint32 if x.dtype == np.float32 else np.uint64)
  top = np.array(1 << (bits.itemsize * 8 - 1), bits.dtype)
  return np.where(bits >= top, ~bits, bits | top)


def c_argsort(x: np.ndarray) -> np.ndarray:
  perm = np.empty(x.size, np.uint32)
  isotonic.host_kernel.argsort(np.ascontiguousarray(x), perm, x.dtype == np.float64)
  return perm.astype(np.int64)


def exact_prox_row(x: np.ndarray, t: float) -> np.ndarray:
  """The kernel's arithmetic on one finite row, t > 0 and below the spread, in Python floats.

  Stable sort of the float keys, then pool adjacent violators on
  v_k = z_k − a(2k − n − 1) with the kernel's merge test and summation order,
  then block means scattered back: the kernel's result bit for bit.
  """
  n = x.size
  p = np.argsort(float_keys(x), kind="stable")
  z = x[p].astype(np.float64)
  assert np.isfinite(z).all() and 0 < t < z[-1] - z[0]
  a = t / (n - 1)
  v = (z - a * (2 * np.arange(1, n + 1) - n - 1).astype(np.float64)).tolist()
  sums, sizes = [], []
  for s in v:
    c = 1
    while sums and sums[-1] * c > s * sizes[-1]:
      s += sums.pop()
      c += sizes.pop()
    sums.append(s)
    sizes.append(c)
  fit = np.repeat(np.array(sums) / np.array(sizes, np.float64), sizes)
  out = np.empty(n, x.dtype)
  out[p] = fit.astype(x.dtype)
  return out


def long_row(kind: str, d: int, dtype, rng) -> np.ndarray:
  if kind == "gaussian":  # weights: a few binades, most buckets of the top digit empty
    return rng.normal(0, 0.05, d).astype(dtype)
  if kind == "ties":  # whole buckets of equal keys: their passes are skipped
    return (np.round(rng.normal(0, 1, d) * 4) / 4).astype(dtype)
  if kind == "wide":  # many binades, many small buckets (merge-sorted in the MSD regime)
    return (rng.normal(0, 1, d) * 10.0 ** rng.integers(-30, 30, d)).astype(dtype)
  if kind == "one_binade":  # one bucket of the top digit holds the whole row
    return rng.uniform(1.0, 2.0, d).astype(dtype)
  raise ValueError(f"kind={kind!r}")


def bits(x: np.ndarray) -> np.ndarray:
  return x.view(np.uint32 if x.dtype == np.float32 else np.uint64)


@needs_c
@pytest.mark.parametrize("d", [MSD_ROW - 1, MSD_ROW, 1_000_003, PREFETCH_ROW, PREFETCH_ROW + 1])
@pytest.mark.parametrize("kind", ["gaussian", "ties", "wide", "one_binade"])
def test_long_float32_argsort_is_a_stable_argsort_of_the_float_keys(d, kind):
  rng = np.random.default_rng(d)
  x = long_row(kind, d, np.float32, rng)
  # Signed zeros and special values tie in value, not in key; one of each at random places.
  specials = np.array([0.0, -0.0, np.finfo(np.float32).max, -np.finfo(np.float32).max,
                       np.finfo(np.float32).smallest_subnormal, np.inf, -np.inf, np.nan, -np.nan], np.float32)
  x[rng.choice(d, specials.size, replace=False)] = specials
  np.testing.assert_array_equal(c_argsort(x), np.argsort(float_keys(x), kind="stable"))


@needs_c
@pytest.mark.parametrize("d,kind", [(5000, "gaussian"), (MSD_ROW, "gaussian"), (MSD_ROW, "ties"),
                                    (1_000_003, "wide"), (PREFETCH_ROW + 1, "gaussian")])
def test_long_float32_rows_are_the_kernels_exact_arithmetic_bit_for_bit(d, kind):
  rng = np.random.default_rng(7)
  x = long_row(kind, d, np.float32, rng)
  spread = float(x.max()) - float(x.min())
  # Strengths with many merges (most elements pool) and with few.
  t = np.array([spread * 0.3, spread * 1e-5])
  got = isotonic.prox_rows_host(np.stack([x, x]), t)
  for r in range(2):
    np.testing.assert_array_equal(bits(got[r]), bits(exact_prox_row(x, t[r])), err_msg=f"t={t[r]}")


@needs_c
def test_long_float64_rows_are_the_kernels_exact_arithmetic_bit_for_bit():
  rng = np.random.default_rng(8)
  for kind in ("gaussian", "ties"):
    x = long_row(kind, 5000, np.float64, rng)
    t = 0.2 * (x.max() - x.min())
    got = isotonic.prox_rows_host(x[None], np.array([t]))[0]
    np.testing.assert_array_equal(bits(got), bits(exact_prox_row(x, t)), err_msg=kind)


@needs_c
@pytest.mark.parametrize("d", [MSD_ROW, PREFETCH_ROW + 1])
def test_long_rows_special_cases_in_one_call(d):
  # One call, rows of every special case, in the MSD and prefetch regimes: a
  # non-finite row, t = 0, t < 0, NaN t, a collapsing t and a constant row
  # must each give their answer and leave the other rows alone.
  rng = np.random.default_rng(9)
  x = np.stack([long_row("gaussian", d, np.float32, rng) for _ in range(7)])
  x[1, d // 3] = np.nan
  x[2, 5] = -np.inf
  x[6] = np.float32(0.25)
  t = np.array([1e-3, 1e-3, 1e-3, 0.0, -1.0, 10.0, 1e-3])
  got = isotonic.prox_rows_host(x, t)
  np.testing.assert_array_equal(bits(got[0]), bits(exact_prox_row(x[0], t[0])))
  assert np.isnan(got[1]).all() and np.isnan(got[2]).all() and np.isnan(got[4]).all()
  np.testing.assert_array_equal(bits(got[3]), bits(x[3]))
  np.testing.assert_allclose(got[5], x[5].astype(np.float64).mean(), rtol=0, atol=1e-7)
  np.testing.assert_array_equal(bits(got[6]), bits(x[6]))


@needs_c
def test_rows_beyond_the_scatter_prefetch_length():
  # Beyond SCATTER_PREFETCH_ROW the scatter back prefetches ahead. With a
  # strength whose whole ramp (1e-12) is far below half a float32 ulp of every
  # |x| >= 1e-3, only equal values pool and every mean rounds back to its
  # value: the prox is the row itself, bit for bit, and a misplaced write
  # shows. A real strength is checked against the float64 NumPy/SciPy prox.
  d = SCATTER_PREFETCH_ROW + 3
  rng = np.random.default_rng(10)
  x = rng.normal(0, 1, d).astype(np.float32)
  x = np.where(np.abs(x) < 1e-3, np.float32(1e-3), x)
  got = isotonic.prox_rows_host(np.stack([x, x]), np.array([1e-12, 1.0]))
  np.testing.assert_array_equal(bits(got[0]), bits(x))
  want = isotonic.prox_rows_numpy(x[None], np.array([1.0]))[0]
  np.testing.assert_allclose(got[1], want, rtol=0, atol=1e-6 * (np.abs(x).max() + 1.0))
