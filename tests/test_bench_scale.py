"""The scale benchmark: its HLO collective parser, its param layouts, and its quick run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import scale


def test_kernel_shapes_split_n_and_shard_evenly():
  for n, leaves in ((10**5, 1), (10**5, 100), (10**7, 100), (10**8, 1)):
    shapes = scale.kernel_shapes(n, leaves)
    total = sum(r * c for r, c in shapes)
    assert len(shapes) == leaves and all(c % 8 == 0 for _, c in shapes)
    assert 0.9 * n <= total <= 1.02 * n


def test_collectives_parser_on_a_real_gather():
  mesh = Mesh(np.array(jax.devices()), ("x",))
  x = jax.device_put(jnp.ones((16, 64)), NamedSharding(mesh, P(None, "x")))
  # Replicating the result makes XLA all-gather the 16 x 64 array.
  gathered = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, P())).lower(x).compile().as_text()
  local = jax.jit(lambda a: a * 2).lower(x).compile().as_text()
  assert ("all-gather", 16 * 64) in scale.collectives(gathered)
  assert scale.collectives(local) == []
  summed = jax.jit(lambda a: jnp.sum(a, axis=1)).lower(x).compile().as_text()
  assert [k for k, _ in scale.collectives(summed)] == ["all-reduce"]
  # A collective over several arrays has a tuple result: its largest part counts.
  text = "%ar = (f32[17]{0}, f32[4,8]{1,0}) all-reduce(f32[17]{0} %a, f32[4,8]{1,0} %b), replica_groups={}"
  assert scale.collectives(text) == [("all-reduce", 32)]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("scale")
  assert scale.main(["--quick", "--out", str(out), "--no-progress"]) == 0
  with open(out / "scale_quick.json", encoding="utf-8") as f:
    return json.load(f)


def test_quick_run(quick):
  assert quick["benchmark"] == "scale" and quick["settings"]["quick"]
  for key in ("machine", "versions", "source", "runtime_s"):
    assert key in quick
  steps = quick["steps"]
  assert {r["transform"] for r in steps} == set(scale.QUICK_TRANSFORMS)
  for r in steps:
    assert r["median_ms"] > 0 and r["temp_bytes_per_device"] >= 0 and r["ratio_to_adam"] > 0
    assert 0.9e5 <= r["n"] <= 1.02e5
    if r["transform"] == "adam":
      assert r["ratio_to_adam"] == 1.0
  # adam alone is elementwise: no collective in the sharded step.
  assert all(r["collectives"] == 0 and r["sharding_kept"] for r in steps if r["transform"] == "adam")
  c = quick["compress"]
  for run in (c["cold"], c["warm"]):
    assert set(run["seconds"]) >= {"np_sort", "init", "merge", "quantize", "report", "save", "load", "dequantize",
                                   "cluster_weights"}
    assert run["pipeline_ratio_to_sort"] == pytest.approx(run["pipeline_s"] / run["seconds"]["np_sort"])
    assert all(b >= 0 for b in run["extra_peak_bytes"].values())
  assert c["weights"] == 4 * 512 * 512
  kernels = {r["kernel"] for r in quick["prox"]}
  assert kernels == {"np.sort", "numpy_scipy", "host_kernel"}
