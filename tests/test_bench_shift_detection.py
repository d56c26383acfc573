"""The shift-detection benchmark (Nowlan & Hinton 1992, sec. 5): its data, its network, its quick run.

The data checks are independent of the generator's own code: the shift is
re-derived bit by bit with explicit index arithmetic, and the connectivity is
compared with windows written out by hand.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest

from benchmarks import datasets
from benchmarks import shift_detection as sd

METHODS = ("plain", "cross-validation", "weight elimination", "soft-share 5", "soft-share 10")


def test_splits_have_the_protocol_sizes():
  data = sd.make_data()
  assert {k: (v[0].shape, v[1].shape) for k, v in data.items()} == {
      "train": ((100, 20), (100,)), "valid": ((1000, 20), (1000,)), "test": ((1300, 20), (1300,))}


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_second_half_is_the_first_shifted_by_the_label(split):
  x, y = sd.make_data()[split]
  assert set(np.unique(x)) <= {0.0, 1.0} and set(np.unique(y)) == {0.0, 1.0}
  for row, label in zip(x.astype(int), y.astype(int)):
    a, b = row[:10], row[10:]
    step = 1 if label == 1 else -1  # left: b[i] = a[i + 1]; right: b[i] = a[i - 1]
    assert all(b[i] == a[(i + step) % 10] for i in range(10))
  # Both directions are represented about equally, and the patterns vary.
  assert 0.35 < y.mean() < 0.65
  # As many distinct patterns as independent fair draws give (1024 (1 − (1 − 1/1024)^n) expected).
  expected = 1024 * (1 - (1 - 1 / 1024) ** len(x))
  assert len({r.tobytes() for r in x[:, :10]}) > 0.9 * expected


def test_shift_by_hand():
  p = np.array([[1, 0, 0, 0, 0, 0, 0, 0, 0, 1]])
  np.testing.assert_array_equal(datasets.shift(p, np.array([1])), [[0, 0, 0, 0, 0, 0, 0, 0, 1, 1]])  # left
  np.testing.assert_array_equal(datasets.shift(p, np.array([0])), [[1, 1, 0, 0, 0, 0, 0, 0, 0, 0]])  # right


def test_training_set_is_consistent():
  x, y = sd.make_data()["train"]
  assert datasets.consistent(x, y)
  assert not datasets.consistent(np.zeros((2, 20)), np.array([0.0, 1.0]))


def test_connectivity_and_parameter_count():
  idx = sd.connectivity()
  assert idx.shape == (10, 8)
  for j, row in enumerate(idx):
    window = [(j + k) % 10 for k in range(4)]
    assert list(row[:4]) == window                      # 4 adjacent positions of the first block
    assert list(row[4:]) == [10 + i for i in window]    # the same positions of the second block
  # Every input position is seen by exactly 4 hidden units.
  np.testing.assert_array_equal(np.bincount(idx.ravel(), minlength=20), np.full(20, 4))
  params = sd.init_params(0)
  assert sum(v.size for v in jax.tree.leaves(params)) == 101 == sd.NUM_PARAMS
  assert params["hidden"].shape == (10, 9) and params["out"].shape == (11,)


def test_forward_uses_only_the_connected_inputs():
  """Changing an input outside unit 0's window leaves unit 0's pre-activation alone (via the output)."""
  params = sd.init_params(1)
  out_w = np.zeros(11, np.float32)
  out_w[0] = 1.0                                      # the output reads hidden unit 0 only
  params = {"hidden": params["hidden"], "out": jax.numpy.asarray(out_w)}
  x = np.zeros((1, 20), np.float32)
  base = float(sd.logits(params, x)[0])
  for pos in range(20):
    x2 = x.copy()
    x2[0, pos] = 1.0
    moved = abs(float(sd.logits(params, x2)[0]) - base) > 1e-7
    assert moved == (pos in {0, 1, 2, 3, 10, 11, 12, 13}), pos


def test_problem_has_pm1_targets_and_coding():
  """The paper's protocol: targets +1 (left) / -1 (right); the base variant codes the bits as ±1."""
  raw = sd.make_data()
  p = sd.problem()
  for split, (x, y) in p.data.items():
    np.testing.assert_array_equal(y, np.where(raw[split][1] == 1, 1.0, -1.0))
    np.testing.assert_array_equal(x, np.where(raw[split][0] == 1, 1.0, -1.0))
  np.testing.assert_array_equal(sd.problem(coding="01").data["train"][0], raw["train"][0])
  assert math.isclose(float(sd.sign_error(jax.numpy.array([0.3, -2.0, 1.0]), jax.numpy.array([1.0, -1.0, -1.0]))), 1 / 3,
                      rel_tol=1e-6)


def test_quick_run_writes_sane_results(tmp_path):
  assert sd.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
  with open(tmp_path / "shift_detection.json", encoding="utf-8") as f:
    report = json.load(f)
  assert os.path.getsize(tmp_path / "shift_detection.png") > 1000
  assert report["benchmark"] == "shift_detection"
  assert report["settings"]["mode"] == "quick"
  for key in ("versions", "machine", "source", "created_utc", "started_utc", "runtime_s", "goal"):
    assert key in report, key
  seeds = report["settings"]["seeds"]
  assert set(report["summary"]) == set(METHODS) == set(report["runs"])
  for name in METHODS:
    s, runs = report["summary"][name], report["runs"][name]
    chosen = [r for r in runs if r["c"] == s["chosen_c"]]
    assert len(chosen) == seeds == s["test_pct"]["n"]
    assert [r["seed"] for r in chosen] == list(range(seeds))   # the same seeds for every method
    assert (s["paper_test_pct"]["mean"], s["paper_test_pct"]["std"]) == sd.PAPER[name]
    tests = [100 * (1 - r["test_error"]) for r in chosen]
    assert math.isclose(s["test_pct"]["mean"], float(np.mean(tests)), rel_tol=1e-9)
    assert math.isclose(s["test_pct"]["std"], float(np.std(tests, ddof=1)), rel_tol=1e-9, abs_tol=1e-12)
    for r in runs:
      assert 0.0 <= r["test_error"] <= 1.0 and 0.0 <= r["train_error"] <= 1.0
      assert r["noise_stddev"] > 0 and math.isfinite(r["final_cost"])
    if name == "weight elimination":   # λ chosen on validation: the best mean validation error of the grid
      by_c = s.get("chosen_c")
      vals = {c: np.mean([r["valid_error"] for r in runs if r["c"] == c]) for c in {r["c"] for r in runs}}
      assert vals[by_c] == min(vals.values())
    if name.startswith("soft-share"):
      k = int(name.split()[-1])
      for r in runs:
        assert len(r["mixture"]["means"]) == k and len(r["weights"]) == 101
        assert math.isclose(sum(r["mixture"]["weights"]), 1.0, rel_tol=1e-4)
  assert report["goal"]["met"] == (report["goal"]["ordering_as_paper"] and report["goal"]["soft_share_at_least_95"])
