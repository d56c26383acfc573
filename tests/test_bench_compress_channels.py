"""The per-channel k-means benchmark: its grouping, and its quick run's JSON."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

import softshare_jax as ss
from benchmarks import compress_channels as cc


def _lenet5_like(rng):
  return {"Conv_0": {"kernel": rng.normal(size=(5, 5, 1, 4)).astype(np.float32), "bias": np.zeros(4, np.float32)},
          "Dense_0": {"kernel": rng.normal(size=(30, 6)).astype(np.float32), "bias": np.zeros(6, np.float32)}}


def test_per_channel_gives_every_output_channel_its_own_codebook():
  rng = np.random.default_rng(0)
  params = _lenet5_like(rng)
  # Channel c of each kernel scaled by 10^c: a shared codebook could not fit them all.
  for name in params:
    k = params[name]["kernel"]
    params[name]["kernel"] = k * (10.0 ** np.arange(k.shape[-1], dtype=np.float32))
  q = cc.per_channel(params, 4, jax.random.key(0))
  conv, dense = q.tree["Conv_0"]["kernel"], q.tree["Dense_0"]["kernel"]
  assert isinstance(conv, ss.QuantizedLeaf) and isinstance(dense, ss.QuantizedLeaf)
  assert conv.codebook.shape == (4, 4) and conv.axis == (0, 1, 2)
  assert dense.codebook.shape == (6, 4) and dense.axis == (0,)
  assert not isinstance(q.tree["Dense_0"]["bias"], ss.QuantizedLeaf)
  deq = ss.dequantize(q)
  for name in params:
    w, v = params[name]["kernel"], np.asarray(deq[name]["kernel"])
    for c in range(w.shape[-1]):  # each channel: 4 values of its own scale, close to its weights
      assert np.unique(v[..., c]).size <= 4
      assert np.max(np.abs(v[..., c] - w[..., c])) <= np.ptp(w[..., c]) / 2


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("channels")
  assert cc.main(["--quick", "--no-progress", "--out", str(out)]) == 0
  with open(out / "compress_channels_quick.json", encoding="utf-8") as f:
    return json.load(f)


def test_quick_run_json_structure_and_sanity(quick):
  assert quick["mode"] == "quick" and quick["bits"] == [2, 3, 4]
  assert {"machine", "versions", "runtime_s", "settings", "goals"} <= set(quick)
  res = quick["results"]["LeNet-300-100"]
  assert 0.0 <= res["baseline_error"] < 90.0  # better than chance after two epochs
  assert set(res["kmeans"]) == {f"{g}_{b}bit" for g in ("per_channel", "per_tensor") for b in (2, 3, 4)}
  dense_bits = 8 * res["dense_bytes"]
  for label, row in res["kmeans"].items():
    assert 0.0 <= row["error"] <= 100.0
    assert row["max_codebook"] <= 2 ** row["bits"]
    # Packed indices cost `bits` per weight plus codebooks: below 32/bits, above 1.
    assert 1.0 < row["ratio_packed"] < 32 / row["bits"]
    assert row["file_bytes"] > 0 and math.isclose(row["ratio_file"], dense_bits / 8 / row["file_bytes"], rel_tol=1e-9)
  for b in (2, 3, 4):  # per-channel codebooks cost more storage than one per tensor
    assert res["kmeans"][f"per_channel_{b}bit"]["file_bytes"] > res["kmeans"][f"per_tensor_{b}bit"]["file_bytes"]
  g = quick["goals"]["per_channel_4bit_lenet300"]
  assert math.isclose(g["loss_points"], res["kmeans"]["per_channel_4bit"]["error"] - res["baseline_error"])
  assert g["met"] == (g["loss_points"] <= 0.5)
