"""The small-data generalization suite (benchmarks/generalization.py): its data, its selection, its quick run."""

from __future__ import annotations

import json
import math
import os

import jax.numpy as jnp
import numpy as np

from benchmarks import datasets
from benchmarks import generalization as gen


def test_mackey_glass_solves_its_delay_equation():
  """Central differences of the samples match β x(t−17)/(1 + x(t−17)^10) − 0.1 x(t) (an independent check)."""
  x = datasets.mackey_glass(400)
  assert x.shape == (400,) and 0.2 < x.min() < x.max() < 1.5
  t = np.arange(18, 399)
  slope = (x[t + 1] - x[t - 1]) / 2
  rhs = 0.2 * x[t - 17] / (1 + x[t - 17] ** 10) - 0.1 * x[t]
  assert np.max(np.abs(slope - rhs)) < 0.02 and np.std(rhs) > 0.02
  assert np.corrcoef(x[:-50], x[50:])[0, 1] < 0.9          # chaotic: not a fixed point or a short cycle


def test_lagged_by_hand():
  s = np.arange(10.0)
  x, y = datasets.lagged(s, (0, 2), 3)
  np.testing.assert_array_equal(x, [[2, 0], [3, 1], [4, 2], [5, 3], [6, 4]])
  np.testing.assert_array_equal(y, [5, 6, 7, 8, 9])


def test_regression_splits_are_disjoint_and_standardized_on_train():
  x = np.arange(60.0).reshape(30, 2)
  y = np.arange(30.0) * 3
  d = datasets.regression_splits(x, y, {"train": 10, "valid": 8, "test": 12}, seed=0)
  assert {k: len(v[1]) for k, v in d.items()} == {"train": 10, "valid": 8, "test": 12}
  np.testing.assert_allclose(d["train"][0].mean(0), 0, atol=1e-6)
  np.testing.assert_allclose(d["train"][1].std(), 1, atol=1e-6)
  # Undo the standardization: every original y appears exactly once.
  ys = np.concatenate([v[1] for v in d.values()]).astype(np.float64)
  assert len(np.unique(np.round(ys, 4))) == 30


def test_penalties_by_hand():
  theta = {"net": {"a": jnp.array([[1.0, -2.0]]), "b": jnp.array([0.5])}}
  assert math.isclose(float(gen.penalty_fn("weight decay")(theta)), 0.5 * (1 + 4 + 0.25), rel_tol=1e-6)
  we = sum(w * w / (1 + w * w) for w in (1.0, -2.0, 0.5))
  assert math.isclose(float(gen.penalty_fn("weight elimination")(theta)), we, rel_tol=1e-6)
  assert float(gen.penalty_fn("plain")(theta)) == 0.0


def test_select_uses_validation_only():
  recs = [dict(c=c, seed=s, valid_error=v, test_error=t, train_error=0.0)
          for c, s, v, t in [(0.1, 0, 0.5, 0.1), (0.1, 1, 0.5, 0.1), (1.0, 0, 0.2, 0.9), (1.0, 1, 0.4, 0.9)]]
  out = gen.select(recs)
  assert out["chosen_c"] == 1.0 and math.isclose(out["test_error"]["mean"], 0.9)


def test_quick_run_writes_sane_results(tmp_path):
  assert gen.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
  with open(tmp_path / "generalization.json", encoding="utf-8") as f:
    report = json.load(f)
  assert os.path.getsize(tmp_path / "generalization.png") > 1000
  assert report["settings"]["mode"] == "quick"
  labels = {"plain", "weight decay", "weight elimination", *(f"soft-share {k}" for k in gen.COMPONENTS)}
  assert set(report["summary"]) == set(report["settings"]["problems"])
  for problem, methods in report["summary"].items():
    assert set(methods) == labels
    for label, s in methods.items():
      runs = report["runs"][problem][label]
      grid = {r["c"] for r in runs}
      assert s["chosen_c"] in grid
      means = {c: np.mean([r["valid_error"] for r in runs if r["c"] == c]) for c in grid}
      assert means[s["chosen_c"]] == min(means.values())
      chosen = [r["test_error"] for r in runs if r["c"] == s["chosen_c"]]
      assert len(chosen) == report["settings"]["seeds"]
      assert math.isclose(s["test_error"]["mean"], float(np.mean(chosen)), rel_tol=1e-9)
      assert all(math.isfinite(r["test_error"]) for r in runs)
      if label.startswith("soft-share"):
        assert all(len(r["mixture"]["means"]) == int(label.split()[-1]) for r in runs)
  assert report["goal"]["problems_won"] == sum(p["soft_share_no_worse"] for p in report["goal"]["per_problem"].values())
