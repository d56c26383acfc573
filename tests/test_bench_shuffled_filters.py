"""benchmarks/shuffled_filters.py: its helpers against independent references, and a quick run.

References are written out here by hand: the locality of hand-built filters
(all mass in one window → 1, uniform → window/size), a brute-force window
search with explicit modular indices, dot products for the permutation, and
sorted pixel lists for the torus roll.
"""

from __future__ import annotations

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import datasets
from benchmarks import shuffled_filters as sf


# ----------------------------------------------------------------------------
# Locality.


def brute_locality(w, window, shape):
  """Best-window mass share by looping over every window start with explicit mod."""
  m = np.abs(np.asarray(w, np.float64)).reshape(shape)
  total = m.sum()
  if total == 0:
    return math.nan
  if len(shape) == 1:
    (d,) = shape
    return max(sum(m[(s + t) % d] for t in range(window)) for s in range(d)) / total
  h, wd = shape
  best = 0.0
  for a in range(h):
    for b in range(wd):
      best = max(best, sum(m[(a + i) % h, (b + j) % wd] for i in range(window) for j in range(window)))
  return best / total


def test_locality_1d_hand_built():
  d, k = 40, 9
  inside = np.zeros(d)
  inside[[37, 38, 39, 0, 1, 2, 3, 4, 5]] = [1.0, -2.0, 0.5, 3.0, -1.0, 0.1, 0.2, -0.3, 4.0]  # wraps around
  uniform = np.ones(d)
  signs = np.where(np.arange(d) % 2 == 0, 1.0, -1.0)  # |w| uniform, signs alternate
  spread = np.zeros(d)
  spread[[0, 20]] = 1.0  # two far-apart spikes: best window holds half
  filters = np.stack([inside, uniform, signs, spread], axis=1)
  loc = sf.locality(filters, k, (d,))
  np.testing.assert_allclose(loc, [1.0, k / d, k / d, 0.5], rtol=1e-12)


def test_locality_2d_hand_built():
  h, k = 14, 5
  torus = np.zeros((h, h))
  for i in (12, 13, 0, 1, 2):  # a 5x5 block across both seams of the torus
    for j in (11, 12, 13, 0, 1):
      torus[i, j] = 1.0 + 0.1 * i - 0.05 * j
  uniform = np.full((h, h), -0.7)
  too_wide = np.zeros((h, h))
  too_wide[3, 0:6] = 1.0  # six in a row: best 5x5 window holds 5/6
  filters = np.stack([torus.ravel(), uniform.ravel(), too_wide.ravel()], axis=1)
  loc = sf.locality(filters, k, (h, h))
  np.testing.assert_allclose(loc, [1.0, k * k / (h * h), 5 / 6], rtol=1e-12)


def test_weighted_locality_pools_the_mass():
  d, k = 40, 9
  local = np.zeros(d)
  local[3] = 0.5  # a nearly dead filter: one weight, locality 1, mass 0.5
  uniform = np.full(d, -0.1)  # mass 4, locality 9/40
  filters = np.stack([local, uniform, np.zeros(d)], axis=1)  # plus an all-zero filter
  loc = sf.locality(filters, k, (d,))
  want = (0.5 * 1.0 + 4.0 * k / d) / 4.5  # sum of in-window mass / total mass, by hand
  assert math.isclose(sf.weighted_locality(filters, loc), want, rel_tol=1e-12)
  assert math.isclose(float(np.nanmean(loc)), (1.0 + k / d) / 2, rel_tol=1e-12)  # the plain mean differs
  assert math.isnan(sf.weighted_locality(np.zeros((d, 2)), sf.locality(np.zeros((d, 2)), k, (d,))))


def test_locality_zero_filter_is_nan():
  loc = sf.locality(np.zeros((40, 2)), 9, (40,))
  assert np.all(np.isnan(loc))


@pytest.mark.parametrize("shape,window", [((40,), 9), ((12,), 3), ((14, 14), 5), ((6, 6), 3)])
def test_locality_matches_brute_force(shape, window):
  rng = np.random.default_rng(0)
  d = int(np.prod(shape))
  w = rng.normal(size=(d, 5)) * (rng.random((d, 5)) < 0.3)
  w[:, 0] += 0.01  # at least one dense filter
  got = sf.locality(w, window, shape)
  want = [brute_locality(w[:, j], window, shape) for j in range(w.shape[1])]
  np.testing.assert_allclose(got, want, rtol=1e-12)


# ----------------------------------------------------------------------------
# Permutation.


def test_unpermute_filters_inverts_the_permutation():
  rng = np.random.default_rng(1)
  d, n = 196, 7
  perm = sf.permutation("mnist14", d)
  assert sorted(perm.tolist()) == list(range(d)) and not np.array_equal(perm, np.arange(d))
  x = rng.normal(size=(11, d))
  w = rng.normal(size=(d, n))  # filters over permuted positions
  back = datasets.unpermute(w, perm)
  # A filter applied to the permuted input equals the mapped-back filter on the original input.
  np.testing.assert_allclose(datasets.permute(x, perm) @ w, x @ back, rtol=1e-12, atol=1e-12)
  # Exact round trip: permuting the mapped-back filters gives the filters again.
  np.testing.assert_array_equal(datasets.permute(back.T, perm).T, w)
  # And explicit: position perm[j] of the original holds w[j].
  for j in range(d):
    np.testing.assert_array_equal(back[perm[j]], w[j])


def test_local_filter_survives_the_round_trip():
  d, k = 40, 9
  perm = sf.permutation("mnist1d", d)
  local = np.zeros((d, 1))
  local[10:10 + k, 0] = np.arange(1, k + 1)
  permuted = datasets.permute(local.T, perm).T  # the same filter as seen by a network on permuted inputs
  assert sf.locality(permuted, k, (d,))[0] < 1.0  # scrambled
  np.testing.assert_allclose(sf.locality(datasets.unpermute(permuted, perm), k, (d,)), [1.0])


# ----------------------------------------------------------------------------
# Data.


def test_torus_roll_keeps_each_image_multiset():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, size=(50, 14, 14)).astype(np.float64)
  rolled, shifts = datasets.torus_roll(images, np.random.default_rng(3))
  assert rolled.shape == images.shape
  for a, b, (sa, sb) in zip(images, rolled, shifts):
    np.testing.assert_array_equal(np.sort(a.ravel()), np.sort(b.ravel()))
    # Independent check of the roll itself: pixel (i, j) moves to (i + sa, j + sb) mod 14.
    i, j = 3, 11
    assert b[(i + sa) % 14, (j + sb) % 14] == a[i, j]
  assert len({tuple(s) for s in shifts}) > 10  # the shifts really vary


def test_downsample_averages_blocks():
  img = np.arange(28 * 28, dtype=np.float64).reshape(1, 28, 28)
  small = datasets.downsample(img)
  assert small.shape == (1, 14, 14)
  assert small[0, 2, 5] == np.mean(img[0, 4:6, 10:12])


def test_conv_dense_equals_a_circular_convolution():
  """The CNN's dense first layer against a convolution written with np.roll."""
  rng = np.random.default_rng(4)
  shape, k, c1 = (6, 7), 3, 2
  d = 42
  index = sf.conv_index(shape, k)
  kernel = rng.normal(size=(k * k, c1))
  params = {"first": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(c1)}}
  w, _ = sf.dense_first(params, "cnn", jnp.asarray(index), d)
  x = rng.normal(size=(3, *shape))
  got = (x.reshape(3, d) @ np.asarray(w)).reshape(3, *shape, c1)
  r = k // 2
  want = np.zeros_like(got)
  for a in range(k):
    for b in range(k):
      # output p = sum over taps of x[p + (a - r, b - r)] * kernel[tap]
      shifted = np.roll(x, (r - a, r - b), axis=(1, 2))
      want += shifted[..., None] * kernel[a * k + b]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Quick run.


def test_quick_run_writes_sane_json(tmp_path):
  assert sf.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
  with open(tmp_path / "shuffled_filters.json", encoding="utf-8") as f:
    report = json.load(f)
  assert (tmp_path / "shuffled_filters.png").stat().st_size > 1000
  assert not [p for p in os.listdir(tmp_path) if "softshare-tmp-" in p or p.startswith(".tmp-")]
  assert report["benchmark"] == "shuffled_filters"
  assert report["settings"]["mode"] == "quick"
  for key in ("versions", "machine", "source", "created_utc", "started_utc", "runtime_s"):
    assert key in report
  seeds = report["settings"]["seeds"]
  assert set(report["summary"]) == set(sf.DATASETS)
  for name in sf.DATASETS:
    assert set(report["summary"][name]) == set(sf.METHODS)
    for method in sf.METHODS:
      runs = report["runs"][name][method]
      assert [r["seed"] for r in runs] == list(range(seeds))
      for r in runs:
        assert 0.0 <= r["test_acc"] <= 1.0
        assert 0.0 < r["distinct_fraction"] <= 1.0
        assert 0.0 <= r["zero_fraction"] < 1.0
        assert r["locality"] is None or 0.0 < r["locality"] <= 1.0 + 1e-9
        assert r["locality_weighted"] is None or 0.0 < r["locality_weighted"] <= 1.0 + 1e-9
      s = report["summary"][name][method]
      accs = [r["test_acc"] for r in runs]
      assert s["test_acc"]["n"] == seeds
      assert math.isclose(s["test_acc"]["mean"], float(np.mean(accs)), rel_tol=1e-9)
      assert math.isclose(s["test_acc"]["std"], float(np.std(accs, ddof=1)), rel_tol=1e-9, abs_tol=1e-12)
    # The CNN on the original order is local by construction (window = kernel); on the
    # permuted order its filters, mapped back, are scrambled.
    assert math.isclose(report["summary"][name]["CNN, original"]["locality"]["mean"], 1.0, rel_tol=1e-9)
    assert math.isclose(report["summary"][name]["CNN, original"]["locality_weighted"]["mean"], 1.0, rel_tol=1e-9)
    assert report["summary"][name]["CNN, permuted"]["locality"]["mean"] < 0.9
    # A plain FC layer has (almost) all weights distinct; the CNN's dense layer very few.
    assert report["summary"][name]["FC"]["distinct_fraction"]["mean"] > 0.9
    assert report["summary"][name]["CNN, original"]["distinct_fraction"]["mean"] < 0.05
