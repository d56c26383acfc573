"""The compressed_apply benchmark: its quick run and its JSON."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import compressed_apply as bench


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("compressed_apply")
  assert bench.main(["--quick", "--out", str(out), "--no-progress"]) == 0
  with open(out / "compressed_apply.json", encoding="utf-8") as f:
    return json.load(f)


def test_quick_run_records_machine_versions_and_settings(quick):
  assert quick["benchmark"] == "compressed_apply" and quick["settings"]["mode"] == "quick"
  for key in ("machine", "versions", "source", "runtime_s", "created_utc"):
    assert key in quick
  assert quick["versions"]["jax"] and quick["machine"]["cpu_count"] >= 1
  assert quick["settings"]["width"] == bench.QUICK_WIDTH and quick["settings"]["layers"] == bench.LAYERS


def test_quick_run_has_one_row_per_method_and_codebook(quick):
  rows = quick["rows"]
  assert [(r["codebook_entries"], r["method"]) for r in rows] == [
      (k, m) for k in bench.CODEBOOKS for m in bench.METHODS]
  width, layers = bench.QUICK_WIDTH, bench.LAYERS
  for r in rows:
    assert r["index_bits"] == {16: 4, 4: 2}[r["codebook_entries"]]
    assert r["layer_bytes"] == width * width * 4
    assert r["dense_bytes"] == layers * (width * width + width) * 4
    # Packed: the indices at index_bits each, the dense biases, the codebooks (and any small extras).
    assert r["packed_bytes"] >= layers * (width * width * r["index_bits"] // 8 + width * 4)
    assert r["packed_bytes"] < r["dense_bytes"] / 4
    assert r["bound_bytes"] == r["packed_bytes"] + 3 * r["layer_bytes"]
    assert r["temp_over_bound"] == pytest.approx(r["temp_bytes"] / r["bound_bytes"])
    assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
    assert r["ratio_to_dense"] > 0 and len(r["timing"]["times_ms"]) >= 3
    assert r["equal_to_dequantize_then_apply"] is (None if r["method"] == "dense" else True)
  by = {(r["codebook_entries"], r["method"]): r for r in rows}
  for k in bench.CODEBOOKS:
    assert by[k, "dense"]["ratio_to_dense"] == 1.0
    # The measured point of the benchmark (memory is deterministic, unlike time).
    assert by[k, "compressed_apply"]["temp_over_bound"] <= 1.0 < by[k, "dequantize-then-apply"]["temp_over_bound"]
