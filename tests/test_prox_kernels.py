"""The prox kernels' building blocks: the C kernel's radix sort, its scratch
reuse and finiteness test, and the device kernel's compiled memory.

References: a stable ``np.argsort`` of order-preserving integer keys computed
in NumPy, the float64 NumPy/SciPy prox (sort, SciPy PAVA, unsort), and XLA's
own ``memory_analysis`` of the compiled device kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from softshare_jax import isotonic

needs_c = pytest.mark.skipif(isotonic.host_kernel is None, reason="the C host kernel is not built")


def reference_prox(x, t):
  """Float64 prox of t·R on a 1-D array: stable sort, SciPy PAVA, unsort."""
  x = np.asarray(x, np.float64)
  d = x.size
  p = np.argsort(x, kind="stable")
  v = x[p] - t / (d - 1) * (2 * np.arange(1, d + 1) - d - 1)
  y = np.empty(d)
  y[p] = optimize.isotonic_regression(v).x
  return y


def float_keys(x):
  """Unsigned keys whose order is the float order: negatives flip every bit, others the sign bit."""
  bits = x.view(np.uint32 if x.dtype == np.float32 else np.uint64)
  sign = bits >> np.array(bits.itemsize * 8 - 1, bits.dtype)
  top = np.array(1 << (bits.itemsize * 8 - 1), bits.dtype)
  flip = np.where(sign == 1, ~np.zeros_like(bits), top)
  return bits ^ flip


def c_argsort(x):
  perm = np.empty(x.size, np.uint32)
  isotonic.host_kernel.argsort(np.ascontiguousarray(x), perm, x.dtype == np.float64)
  return perm.astype(np.int64)


def special_values(dtype):
  info = np.finfo(dtype)
  nan_neg = np.array(-np.nan, dtype)  # sign bit set: sorts before -inf
  return np.array([0.0, -0.0, np.inf, -np.inf, np.nan, nan_neg, info.tiny, -info.tiny,
                   info.smallest_subnormal, -info.smallest_subnormal, info.max, -info.max, 1.0, -1.0], dtype)


def argsort_inputs(dtype, seed=0):
  rng = np.random.default_rng(seed)
  n = 5000
  return {
      "normal": rng.normal(0, 1, n).astype(dtype),
      "duplicates": rng.integers(-3, 4, n).astype(dtype),
      "signed_zeros": rng.choice(np.array([0.0, -0.0], dtype), n),
      "denormals": (rng.normal(0, 1, n) * np.finfo(dtype).smallest_subnormal * 50).astype(dtype),
      "specials": rng.choice(special_values(dtype), n),
      "all_equal": np.full(n, 0.3, dtype),  # every digit pass skipped
      "one_digit": (1.0 + np.arange(n) % 7 * np.finfo(dtype).eps).astype(dtype),  # low digit only
      "wide_range": (rng.normal(0, 1, n) * 10.0 ** rng.integers(-30, 30, n)).astype(dtype),
  }


@needs_c
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", list(argsort_inputs(np.float32)))
def test_radix_argsort_is_a_stable_argsort_of_the_float_keys(dtype, kind):
  x = argsort_inputs(dtype)[kind]
  np.testing.assert_array_equal(c_argsort(x), np.argsort(float_keys(x), kind="stable"))


@needs_c
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_radix_argsort_orders_finite_floats_like_numpy(dtype):
  # Without signed zeros and NaN, key order is float order: NumPy's stable argsort agrees.
  x = np.random.default_rng(1).normal(0, 1, 20001).astype(dtype)
  x[::7] = x[3]  # ties keep their order
  np.testing.assert_array_equal(c_argsort(x), np.argsort(x, kind="stable"))


@needs_c
def test_radix_argsort_empty_and_single():
  assert c_argsort(np.zeros(0, np.float32)).size == 0
  np.testing.assert_array_equal(c_argsort(np.array([2.5], np.float32)), [0])


@needs_c
@pytest.mark.parametrize("d", [5, 605])
def test_finite_extremes_are_finite_and_every_non_finite_value_makes_the_row_nan(d):
  # Long float32 rows (d = 605, radix sort) are told finite from the top digit of
  # the keys, before sorting: ±FLT_MAX sit next to ±Inf there and must still count
  # as finite. Short rows (d = 5, merge sort) from their sorted ends.
  big = np.finfo(np.float32).max
  rows = np.array([
      [big, -big, 0.0, 1.0, 2.0],
      [big / 2, 3.0, -big / 2, 1.0, np.finfo(np.float32).smallest_subnormal],
      [np.inf, 0.0, 1.0, 2.0, 3.0],
      [-np.inf, 0.0, 1.0, 2.0, 3.0],
      [np.nan, 0.0, 1.0, 2.0, 3.0],
      [-np.nan, 0.0, 1.0, 2.0, 3.0],
  ], np.float32)
  rows = np.concatenate([rows, np.tile(rows[:, 2:], (1, (d - 5) // 3))], axis=1)
  assert rows.shape == (6, d)
  t = np.array([1e37, 1e37, 0.5, 0.5, 0.5, 0.5])
  got = isotonic.prox_rows_host(rows, t)
  for r in range(2):
    want = reference_prox(rows[r], t[r])
    np.testing.assert_allclose(got[r], want, rtol=1e-6, atol=0)
    assert np.isfinite(got[r]).all()
  assert np.isnan(got[2:]).all()


@needs_c
def test_scratch_reuse_across_sizes_and_dtypes():
  # The C kernel keeps one scratch block between calls: every order of sizes and
  # element widths must still see a block large enough and leave no trace.
  rng = np.random.default_rng(2)
  for d, dtype in [(3000, np.float32), (10, np.float64), (4000, np.float64), (500, np.float32),
                   (5000, np.float32), (2, np.float32), (4500, np.float64)]:
    x = rng.normal(0, 1, (2, d)).astype(dtype)
    t = np.array([0.3, 0.05])
    got = isotonic.prox_rows_host(x, t)
    assert got.dtype == dtype
    for r in range(2):
      np.testing.assert_allclose(got[r], reference_prox(x[r], t[r]), rtol=0,
                                 atol=1e-5 * (np.abs(x[r]).max() + t[r]) if dtype == np.float32 else 1e-12)


@needs_c
@pytest.mark.parametrize("kind", ["gaussian", "ties", "chain"])
def test_c_kernel_matches_the_numpy_fallback(kind):
  rng = np.random.default_rng(3)
  d = 20000
  if kind == "gaussian":
    x, t = rng.normal(0, 0.05, d).astype(np.float32), 1e-3
  elif kind == "ties":
    x, t = (np.round(rng.normal(0, 1, d) * 4) / 4).astype(np.float32), 0.5
  else:
    m = 1.01 * d * (d + 1) / 2
    k = np.arange(1, d + 1)
    v = np.arange(d, dtype=np.float64) - 1
    v[0] = m
    x = ((v + m / 2 * (2 * k - d - 1)) / 2.0**40).astype(np.float32)[rng.permutation(d)]
    t = m / 2 * (d - 1) / 2.0**40
  got = isotonic.prox_rows_host(x[None], np.array([t]))[0]
  want = isotonic.prox_rows_numpy(x[None], np.array([t]))[0]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * (np.abs(x).max() + t))
  np.testing.assert_allclose(got, reference_prox(x, t), rtol=0, atol=1e-5 * (np.abs(x).max() + t))


# ----------------------------------------------------------------------------
# Short rows: the C kernel sorts rows of up to SHORT_ROW elements with
# branchless merges instead of its radix sort (hostprox.c's SHORT_ROW32 and
# SHORT_ROW64). Lengths around those thresholds and around the merges' run and
# power-of-two boundaries, with ties, signed zeros, denormals and non-finite rows.

SHORT_ROW = {np.float32: 384, np.float64: 2048}


def short_lengths(dtype):
  edge = SHORT_ROW[dtype]
  return list(range(1, 301)) + [511, 512, 513, edge - 1, edge, edge + 1]


def short_rows(dtype, d, rng):
  """Rows of every kind the short path must order exactly, one of each, some with a non-finite value."""
  tiny = np.finfo(dtype).smallest_subnormal
  rows = np.stack([
      rng.normal(0, 1, d),
      np.round(rng.normal(0, 1, d) * 2) / 4,  # many ties
      rng.choice([0.0, -0.0, 1.0, -1.0], d),  # signed zeros tie in value, not in key
      rng.normal(0, 1, d) * tiny * 20,  # denormals
      np.sort(rng.normal(0, 1, d))[::-1],  # reversed
      rng.normal(0, 1, d) * 10.0 ** rng.integers(-20, 20, d),
      rng.normal(0, 1, d),
      rng.normal(0, 1, d),
  ]).astype(dtype)
  rows[6, rng.integers(0, d)] = rng.choice([np.nan, -np.nan, np.inf, -np.inf])
  rows[7, rng.integers(0, d)] = np.nan
  t = rng.choice([1e-3, 0.1, 0.5, 1e-30, 1e30], len(rows))
  t[rng.integers(0, len(rows))] = rng.choice([0.0, -1.0, np.nan])
  return rows, t


def exact_prox_row(x, t):
  """The C kernel's arithmetic on one row in Python floats (IEEE float64, the
  same operations in the same order) after a stable sort of the float keys:
  the kernel's result bit for bit, whichever sort it uses."""
  dtype, n = x.dtype, x.size
  if not t >= 0:
    return np.full(n, np.nan, dtype)
  if t == 0 or n == 1:
    return x.copy()
  p = np.argsort(float_keys(x), kind="stable")
  z = [float(v) for v in x[p]]
  if not (np.isfinite(z[0]) and np.isfinite(z[-1])):
    return np.full(n, np.nan, dtype)
  if z[-1] == z[0]:
    return x.copy()
  if t >= z[-1] - z[0]:  # one cluster: the compensated (Neumaier) mean
    s = c = 0.0
    for v in z:
      u = s + v
      c += (s - u) + v if abs(s) >= abs(v) else (v - u) + s
      s = u
    return np.full(n, (s + c) / n, dtype)
  a = t / (n - 1)
  sums, sizes = [], []
  for k, v in enumerate(z):
    v = v - a * float(2 * (k + 1) - n - 1)
    c = 1
    while sums and sums[-1] * c > v * sizes[-1]:
      v += sums.pop()
      c += sizes.pop()
    sums.append(v)
    sizes.append(c)
  out = np.empty(n, dtype)
  k = 0
  for s, c in zip(sums, sizes):
    out[p[k:k + c]] = s / c
    k += c
  return out


def bits(x):
  return x.view(np.uint32 if x.dtype == np.float32 else np.uint64)


@needs_c
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_short_rows_argsort_is_a_stable_argsort_of_the_float_keys(dtype):
  rng = np.random.default_rng(4)
  for d in short_lengths(dtype):
    for x in short_rows(dtype, d, rng)[0]:
      np.testing.assert_array_equal(c_argsort(x), np.argsort(float_keys(x), kind="stable"), err_msg=f"d={d}")
    x = rng.choice(special_values(dtype), d)
    np.testing.assert_array_equal(c_argsort(x), np.argsort(float_keys(x), kind="stable"), err_msg=f"d={d}")


@needs_c
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_short_rows_are_the_kernels_exact_arithmetic_bit_for_bit(dtype):
  # All kinds of rows in one call: a non-finite or t < 0 row must not touch its neighbours.
  rng = np.random.default_rng(5)
  for d in short_lengths(dtype):
    x, t = short_rows(dtype, d, rng)
    got = isotonic.prox_rows_host(x, t)
    assert got.dtype == dtype
    for r in range(len(x)):
      np.testing.assert_array_equal(bits(got[r]), bits(exact_prox_row(x[r], t[r])), err_msg=f"d={d} row={r}")


@needs_c
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_short_rows_match_the_numpy_fallback(dtype):
  # Many short rows in one call, as weight_sharing_prox(axis=0) sends them.
  rng = np.random.default_rng(6)
  for d in [2, 3, 7, 8, 9, 17, 64, 100, 257]:
    x = np.concatenate([short_rows(dtype, d, rng)[0] for _ in range(25)])
    t = rng.choice([1e-3, 0.05, 0.5, 3.0], len(x))
    got = isotonic.prox_rows_host(x, t)
    want = isotonic.prox_rows_numpy(x, t)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    scale = np.nanmax(np.where(np.isfinite(x), np.abs(x), np.nan), axis=1, keepdims=True) + t[:, None]
    tol = 1e-6 if dtype == np.float32 else 1e-14
    err = np.nan_to_num(np.abs(got - want))
    assert (err <= tol * scale).all(), (d, err.max())


# ----------------------------------------------------------------------------
# Device kernel memory (compile-time facts: no timing).

# The device kernel's temporary memory over its input, for one float32 row of
# 2^20: 37.5 at first (14 pairs of prefix-sum passes alive at once, the
# permutation, the sorted row and the bounded-depth pass's hoisted gathers kept
# through the fit), then 12.25, then 7.0 (the permutation sorted for after the
# fit, the sorted row not kept for its ends, the pooled fit not kept through
# the bounded-depth pass, that pass's merge without a scatter's index arrays),
# now 3.29 at every size and row count: the fit is not stored but its blocks,
# as one int32 link per element, their means taken from the prefix sums when
# needed; the scans write a column at a time in place, each gather is
# recomputed per use rather than kept, and the search positions are updated in
# place. What is left at the peak: the (hi, lo) prefix sums, the links, the
# search positions and the search's boolean test (the links or the positions
# in the output's buffer).
DEVICE_TEMP_OVER_INPUT = 3.5


def device_memory(rows, d):
  x = jax.ShapeDtypeStruct((rows, d), jnp.float32)
  t = jax.ShapeDtypeStruct((rows,), jnp.float32)
  return jax.jit(isotonic.prox_rows_device).lower(x, t).compile().memory_analysis()


@pytest.mark.parametrize("rows,d", [(1, 2**20), (1, 2**23), (64, 2**14)])
def test_device_kernel_temporary_memory_is_bounded(rows, d):
  # Many rows too: take_along_axis pairs each index with its row number, and
  # constant index arrays made ahead of time once took 16x the input.
  mem = device_memory(rows, d)
  ratio = mem.temp_size_in_bytes / (4 * rows * d)
  assert mem.temp_size_in_bytes <= DEVICE_TEMP_OVER_INPUT * 4 * rows * d + 2**16, ratio


def reference_isotonic(v):
  return optimize.isotonic_regression(np.asarray(v, np.float64)).x


@pytest.mark.parametrize("d", [2, 3, 5, 127, 128, 129, 300, 1000, 4097])
def test_bounded_depth_pass_alone_matches_scipy(d):
  # No pooling rounds: the bounded-depth pass fits every row from singletons
  # (rows of every kind side by side, lengths around the scans' 128 columns).
  rng = np.random.default_rng(d)
  z = np.sort(np.stack([
      rng.normal(0, 1, d),
      np.round(rng.normal(0, 1, d) * 2) / 4,  # ties
      np.zeros(d),
      rng.normal(0, 1, d) * 10.0 ** rng.integers(-3, 3, d),
  ]).astype(np.float32), axis=1)
  t = np.array([0.3, 2.0, 0.5, 50.0], np.float32)
  a = (t / max(d - 1, 1)).astype(np.float32)
  fit = np.asarray(isotonic.isotonic_fit_sorted(jnp.asarray(z), jnp.asarray(a), rounds=0))
  k = np.arange(1, d + 1)
  for r in range(len(z)):
    want = reference_isotonic(z[r].astype(np.float64) - a[r] * (2 * k - d - 1))
    np.testing.assert_allclose(fit[r], want, rtol=0, atol=1e-5 * (np.abs(z[r]).max() + t[r]), err_msg=f"row {r}")


def test_settled_rows_do_not_depend_on_a_row_that_needs_the_bounded_depth_pass():
  rng = np.random.default_rng(7)
  d = 600
  k = np.arange(1, d + 1)
  m = 1.01 * d * (d + 1) / 2
  v = np.arange(d, dtype=np.float64) - 1
  v[0] = m
  chain = ((v + m / 2 * (2 * k - d - 1)) / 2.0**40).astype(np.float32)  # defeats pooling
  t_chain = m / 2 * (d - 1) / 2.0**40
  calm = rng.normal(0, 0.05, d).astype(np.float32)  # settles in the pooling rounds
  t = jnp.asarray([1e-3, t_chain], jnp.float32)
  both = np.asarray(isotonic.prox_rows_device(jnp.asarray(np.stack([calm, chain])), t))
  alone = np.asarray(isotonic.prox_rows_device(jnp.asarray(calm[None]), jnp.asarray([1e-3], jnp.float32)))
  np.testing.assert_array_equal(both[0].view(np.uint32), alone[0].view(np.uint32))
  np.testing.assert_allclose(both[0], reference_prox(calm, 1e-3), rtol=0, atol=1e-6)
  scale = np.abs(chain).max() + t_chain
  np.testing.assert_allclose(both[1], reference_prox(chain, t_chain), rtol=0, atol=1e-5 * scale)
