"""The prox-strength benchmark: its group counting, by hand, and its quick run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import prox_strength as ps


def test_groups_and_layer_stats_by_hand():
  w = np.array([[1.0, 2.0, 5.0], [1.0, 3.0, 5.0], [1.0, 2.0, 6.0], [4.0, 2.0, 5.0]], np.float32)
  assert [g.tolist() for g in ps.groups_of(w, 0)] == [[1, 1, 1, 4], [2, 3, 2, 2], [5, 5, 6, 5]]
  assert [g.size for g in ps.groups_of(w, None)] == [12]
  params = {"Dense_0": {"kernel": w, "bias": np.zeros(3)}}
  by_neuron = ps.layer_stats(params, 0)["Dense_0/kernel"]
  # Distinct values per column: 2, 2, 2 -> median 2; no column is a single value.
  assert by_neuron == {"groups": 3, "d": 4, "distinct_median": 2.0, "distinct_min": 2, "distinct_max": 2,
                       "collapsed_share": 0.0}
  whole = ps.layer_stats(params, None)["Dense_0/kernel"]
  assert whole["groups"] == 1 and whole["d"] == 12 and whole["distinct_median"] == 6.0  # {1, 2, 3, 4, 5, 6}
  collapsed = ps.layer_stats({"Dense_0": {"kernel": np.array([[1.0, 2.0], [1.0, 3.0]])}}, 0)["Dense_0/kernel"]
  assert collapsed["collapsed_share"] == 0.5 and collapsed["distinct_min"] == 1


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("prox_strength")
  assert ps.main(["--quick", "--out", str(out), "--no-progress"]) == 0
  with open(out / "prox_strength.json", encoding="utf-8") as f:
    return json.load(f)


def test_quick_run(quick):
  assert quick["benchmark"] == "prox_strength" and quick["settings"]["mode"] == "quick"
  for key in ("machine", "versions", "source", "runtime_s"):
    assert key in quick
  rows = {(r["axis"], r["strength"], r["epochs"]): r for r in quick["results"]}
  checkpoints = ps.QUICK["checkpoints"]
  assert set(rows) == {(str(a), s, e) for a in ps.QUICK["axes"] for s in ps.QUICK["strengths"] for e in checkpoints}
  for (axis, strength, epochs), r in rows.items():
    steps = epochs * (1347 // 64)
    assert r["t"] == pytest.approx(strength * ps.LEARNING_RATE)
    assert r["T_over_sigma"] == pytest.approx(r["t"] * steps / quick["runs"][0]["sigma"])
    assert 0.5 < r["test_accuracy"]["mean"] <= 1.0  # learned something in 2 epochs (chance is 0.1)
    for layer in r["layers"].values():
      assert layer["d"] == (64 if axis == "0" else layer["d"])
      assert 1 <= layer["distinct_min"] <= layer["distinct_median"] <= layer["distinct_max"] <= layer["d"]
  # Plain SGD keeps (almost) every weight distinct; the prox merges some: fewer distinct values per group.
  last = checkpoints[-1]
  for axis in ("0", "None"):
    plain, prox = rows[(axis, 0.0, last)], rows[(axis, ps.QUICK["strengths"][-1], last)]
    assert sum(v["distinct_median"] for v in prox["layers"].values()) < sum(
        v["distinct_median"] for v in plain["layers"].values())
  # The plain run is trained once per seed and counted under both axes: the same accuracy.
  assert rows[("0", 0.0, last)]["test_accuracy"]["mean"] == rows[("None", 0.0, last)]["test_accuracy"]["mean"]
