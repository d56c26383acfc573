"""The compression-recipe benchmark: its quick run and its summary."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import recipe


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("recipe")
  assert recipe.main(["--quick", "--out", str(out), "--no-progress"]) == 0
  with open(out / "recipe.json", encoding="utf-8") as f:
    return json.load(f)


def test_quick_run_records_the_recipe(quick):
  assert quick["benchmark"] == "recipe" and quick["settings"]["mode"] == "quick"
  for key in ("machine", "versions", "source", "runtime_s"):
    assert key in quick
  assert "mixture_update='em'" in quick["settings"]["recipe"]
  (run,) = quick["runs"]
  assert run["start"] == "adam" and run["setting"] == "recipe, pi0=0.99" and run["N"] == 1347
  assert run["strength"] == pytest.approx(recipe.C_RECIPE / 1347)
  for f in ("pretrained_accuracy", "retrained_accuracy", "quantized_accuracy", "finetuned_accuracy"):
    assert 0.0 <= run[f] <= 1.0
  assert run["pretrained_accuracy"] > 0.5  # 5 epochs of Adam learn the digits (chance: 0.1)
  assert run["ratio"] > 1.0
  # The report's quality section is recorded: one relative change per kernel, and their maximum.
  assert set(run["relative_change"]) == {"Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"}
  assert run["max_relative_change"] == max(run["relative_change"].values())
  assert all(math.isfinite(v) and v >= 0 for v in run["relative_change"].values())
  assert bool(run["warnings"]) == (run["max_relative_change"] > recipe.ss.CompressionReport.RELATIVE_CHANGE_WARNING)


def test_summary_means_over_seeds():
  runs = [{"model": "m", "start": "adam", "setting": "recipe, pi0=0.99", "c": 0.01, "N": 10, "strength": 1e-3,
           "pretrained_accuracy": a, "retrained_accuracy": a, "quantized_accuracy": a, "finetuned_accuracy": a,
           "ratio": r, "max_relative_change": 0.1, "warnings": w} for a, r, w in ((0.9, 10.0, []), (0.7, 20.0, ["x"]))]
  (row,) = recipe.summarize(runs)
  assert row["quantized_accuracy"]["mean"] == pytest.approx(0.8)
  assert row["ratio"]["mean"] == pytest.approx(15.0) and row["ratio"]["std"] == pytest.approx(math.sqrt(50.0))
  assert row["warned"] == 1 and row["runs"] == 2
