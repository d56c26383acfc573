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


def test_select_chooses_prior_and_c_together_on_validation():
  recs = [dict(c=c, seed=s, valid_error=v, test_error=t, train_error=0.0, precision_prior=p)
          for p, c, s, v, t in [("auto", 0.1, 0, 0.3, 0.1), ("auto", 0.1, 1, 0.3, 0.1),
                                ("nu=100", 0.1, 0, 0.2, 0.9), ("nu=100", 0.1, 1, 0.2, 0.9),
                                ("nu=100", 1.0, 0, 0.4, 0.0), ("nu=100", 1.0, 1, 0.4, 0.0)]]
  out = gen.select(recs)
  assert (out["chosen_precision_prior"], out["chosen_c"]) == ("nu=100", 0.1)
  assert math.isclose(out["test_error"]["mean"], 0.9)
  assert out["valid_error_by_c"] == {"0.1": 0.2, "1.0": 0.4}
  assert out["valid_error_by_prior"]["auto"] == {"0.1": 0.3}


def test_goal_chooses_soft_share_components_on_validation():
  def summary(valid, test):
    return {"summary": {"valid_error": {"mean": valid}, "test_error": {"mean": test}}}
  res = {"p": {"plain": summary(1.0, 1.0), "weight decay": summary(0.5, 0.5), "weight elimination": summary(0.6, 0.6),
               "soft-share 4": summary(0.4, 0.55), "soft-share 8": summary(0.45, 0.3)}}
  g = gen.goal(res)["per_problem"]["p"]
  # K = 8 has the lower test error but K = 4 the lower validation error: K = 4 is the one compared.
  assert g["soft_share_chosen"] == "soft-share 4" and g["best_soft_share"] == 0.55
  assert g["best_baseline"] == 0.5 and not g["soft_share_no_worse"]


def test_fixed_scale_precision_prior_by_hand():
  """The nu prior adds −(ν/2) log λ_j + (ν σ_ref²/2) λ_j per component, zero component included (NumPy)."""
  w = np.array([0.3, -1.2, 0.7, 2.0])
  theta = {"net": {"a": jnp.asarray(w[:3].reshape(1, 3), jnp.float32), "b": jnp.asarray(w[3:], jnp.float32)}}
  spec = gen.MixtureSpec(True, 10.0)
  theta["mixture"] = gen.initial_theta(
      gen.Problem("toy", {}, lambda seed: theta["net"], None, None, ""), "soft-share", 2, 0, False, spec)["mixture"]
  m = theta["mixture"]
  mu = np.asarray(m.means, np.float64)
  lam = np.asarray(m.precisions, np.float64)
  pi = np.asarray(m.weights, np.float64)
  dens = pi * np.sqrt(lam / (2 * np.pi)) * np.exp(-0.5 * lam * (w[:, None] - mu) ** 2)
  nu, s2 = 10.0, gen.MIXTURE_STDDEV ** 2
  want = -np.log(dens.sum(1)).sum() + np.sum(-(nu / 2) * np.log(lam) + nu * s2 / 2 * lam)
  got = float(gen.penalty_fn("soft-share", spec)(theta))
  assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-4)
  assert np.allclose(mu, [0.0, -1.0, 1.0]) and np.allclose(pi, [gen.ZERO_WEIGHT, 0.25, 0.25])
  assert np.allclose(lam, 1.0 / gen.MIXTURE_STDDEV ** 2)


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
      keys = {(r.get("precision_prior"), r["c"]) for r in runs}
      chosen_key = (s.get("chosen_precision_prior"), s["chosen_c"])
      assert chosen_key in keys
      means = {k: np.mean([r["valid_error"] for r in runs if (r.get("precision_prior"), r["c"]) == k]) for k in keys}
      assert means[chosen_key] == min(means.values())
      chosen = [r["test_error"] for r in runs if (r.get("precision_prior"), r["c"]) == chosen_key]
      assert len(chosen) == report["settings"]["seeds"]
      assert math.isclose(s["test_error"]["mean"], float(np.mean(chosen)), rel_tol=1e-9)
      assert all(math.isfinite(r["test_error"]) for r in runs)
      if label.startswith("soft-share"):
        # K free components and the zero component (mean 0), under every candidate prior.
        assert all(len(r["mixture"]["means"]) == int(label.split()[-1]) + 1 for r in runs)
        assert all(r["mixture"]["means"][0] == 0.0 for r in runs)
        assert {r["precision_prior"] for r in runs} == {spec.label for spec in gen.SPECS}
  assert report["goal"]["problems_won"] == sum(p["soft_share_no_worse"] for p in report["goal"]["per_problem"].values())
