"""Compression algorithms at model size: mixture init, merging and k-means against one np.sort.

    python -m benchmarks.compress_algorithms [--quick] [--out DIR] [--no-progress]

For 8 kernels of 2048 × 2048 (3.4e7 float32 weights; ``--quick``: 4 of
500 × 500, 1e6), each algorithm is timed against ``np.sort`` of all the same
weights, measured in the same run (the yardstick: the old mixture init and
k-means cost 50× and 500× it):

* ``init_mixture`` (16 free components and the zero component) with
  ``init="range"`` (the median |w| for the zero component), ``"quantile"``
  and ``"kmeans++"``, and ``"range"`` under ``jax.jit`` (the traced path);
* ``lloyd_1d`` (softshare_jax/compress/lloyd.py), 16 centres from the linear
  init, on every sorted kernel, and the former ``np.bincount`` Lloyd's
  iterations (kept here as the reference) on one kernel, scaled to all;
* ``cluster_weights(params, 16)`` (per-tensor k-means, k-means++ seeding);
* ``merge_components`` on mixtures of K = 1000, 2000, 4000 components
  (``--quick``: 250, 500), where most pairs merge.

Times are medians of a few calls after a warm-up (compilation), on a machine
shared with other processes: compare the ratios to np.sort, not the seconds.
Memory is the growth of the process's peak resident set during the call (the
kernel's high-water mark, reset before each call through
``/proc/self/clear_refs``; Linux only, else null), reported over the params'
bytes. Writes ``<out>/compress_algorithms.json`` (only without ``--quick``).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import numpy as np

from benchmarks import common

FULL = {"leaves": 8, "shape": (2048, 2048), "merge_k": (1000, 2000, 4000)}
QUICK = {"leaves": 4, "shape": (500, 500), "merge_k": (250, 500)}
COMPONENTS = 16
CLUSTERS = 16
MERGE_THRESHOLD = 1.0


def _rss_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def peak_growth_bytes(fn: Callable[[], Any]) -> tuple[Any, int | None]:
  """Runs ``fn()``; returns its output and how far the peak RSS rose above the RSS before it (bytes)."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")  # resets VmHWM to the current RSS
  except OSError:
    return fn(), None
  before = _rss_kib("VmRSS")
  out = fn()
  peak = _rss_kib("VmHWM")
  return out, None if before is None or peak is None else max(0, peak - before) * 1024


def reference_lloyd(x_sorted: np.ndarray, centres: np.ndarray, max_iterations: int = 300) -> np.ndarray:
  """The former Lloyd's iterations: every weight assigned with searchsorted, sums by bincount."""
  c = np.sort(np.asarray(centres, np.float64))
  for _ in range(max_iterations):
    a = np.searchsorted((c[1:] + c[:-1]) / 2, x_sorted)
    counts = np.bincount(a, minlength=c.size)
    sums = np.bincount(a, weights=x_sorted, minlength=c.size)
    new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), c))
    if np.array_equal(new, c):
      break
    c = new
  return c


def make_params(leaves: int, shape: tuple[int, int], seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {f"layer{i}": {"kernel": (rng.standard_normal(shape, np.float32) * 0.05)} for i in range(leaves)}


def make_mixture(k: int, seed: int = 0):
  """K free components with means N(0, 1), σ = 0.02 and random proportions, plus the zero component."""
  import jax.numpy as jnp

  import softshare_jax as ss

  rng = np.random.default_rng(seed)
  return ss.Mixture(jnp.asarray(np.sort(rng.standard_normal(k)), jnp.float32),
                    jnp.full((k + 1,), 2 * np.log(50.0), jnp.float32),
                    jnp.asarray(rng.standard_normal(k), jnp.float32), jnp.array(0.0), has_zero=True)


def measure(name: str, fn: Callable[[], Any], baseline_s: float, param_bytes: int, *, repeats: int = 3,
            scale: float = 1.0, note: str = "") -> dict:
  """Times ``fn`` (median after one warm-up call), then its peak memory growth in one more call."""
  timing, _ = common.time_call(fn, warmup=1, min_repeats=1, max_repeats=repeats, budget_s=5.0, stop_after_s=30.0)
  _, grown = peak_growth_bytes(lambda: common.block(fn()))
  seconds = timing.median_s * scale
  return {"name": name, "seconds": seconds, "ratio_to_sort": seconds / baseline_s,
          "peak_growth_bytes": grown, "peak_growth_over_params": None if grown is None else grown / param_bytes,
          "timing": timing.to_dict(), "note": note}


def run(cfg: dict, progress: bool = True) -> dict:
  import jax

  import softshare_jax as ss
  from softshare_jax.compress.lloyd import lloyd_1d

  params = make_params(cfg["leaves"], cfg["shape"])
  leaves = [v["kernel"] for v in params.values()]
  n = sum(x.size for x in leaves)
  param_bytes = 4 * n
  everything = np.concatenate([x.ravel() for x in leaves])
  sort_timing, _ = common.time_call(lambda a=everything: np.sort(a), warmup=1, min_repeats=3, max_repeats=5)
  base = sort_timing.median_s
  del everything
  rows = []
  steps: list[tuple[str, Callable[[], Any], dict]] = []
  for init in ("range", "quantile", "kmeans++"):
    steps.append((f"init_mixture init={init}",
                  functools.partial(ss.init_mixture, params, COMPONENTS, init=init, key=jax.random.key(0)), {}))
  jitted = jax.jit(functools.partial(ss.init_mixture, num_components=COMPONENTS))
  steps.append(("init_mixture init=range under jit", lambda: jitted(params), {}))
  sorted_leaves = [np.sort(x.ravel()) for x in leaves]
  steps.append(("lloyd_1d (all kernels, linear init)",
                lambda: [lloyd_1d(x, np.linspace(x[0], x[-1], CLUSTERS)) for x in sorted_leaves], {}))
  one = sorted_leaves[0]
  steps.append(("former bincount Lloyd (one kernel, x kernels)",
                lambda: reference_lloyd(one, np.linspace(one[0], one[-1], CLUSTERS)),
                {"repeats": 1, "scale": len(leaves), "note": "timed on one kernel, times the number of kernels"}))
  steps.append((f"cluster_weights k={CLUSTERS}",
                lambda: ss.cluster_weights(params, CLUSTERS, key=jax.random.key(0)), {"repeats": 1}))
  for k in cfg["merge_k"]:
    mixture = make_mixture(k)
    steps.append((f"merge_components K={k}", functools.partial(ss.merge_components, mixture, MERGE_THRESHOLD),
                  {"repeats": 1}))
  for name, fn, kw in common.progress_bar(steps, desc="algorithms", enabled=progress):
    rows.append(measure(name, fn, base, param_bytes, **kw))
  merged = {k: ss.merge_components(make_mixture(k), MERGE_THRESHOLD).num_components for k in cfg["merge_k"]}
  return {"weights": n, "leaves": cfg["leaves"], "shape": list(cfg["shape"]), "param_bytes": param_bytes,
          "np_sort_seconds": base, "np_sort_timing": sort_timing.to_dict(), "rows": rows,
          "merge_threshold": MERGE_THRESHOLD, "merged_components": merged}


def table(result: dict) -> str:
  lines = [f"{result['weights']:.3g} weights; np.sort {result['np_sort_seconds']:.3f} s",
           f"{'algorithm':48s} {'seconds':>9s} {'x np.sort':>10s} {'peak +MB':>9s} {'x params':>9s}"]
  for r in result["rows"]:
    grown = r["peak_growth_bytes"]
    mb = "n/a" if grown is None else f"{grown / 2**20:9.1f}"
    over = "n/a" if grown is None else f"{r['peak_growth_over_params']:9.2f}"
    lines.append(f"{r['name']:48s} {r['seconds']:9.3f} {r['ratio_to_sort']:10.1f} {mb:>9s} {over:>9s}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = common.argument_parser("compress_algorithms", __doc__, "1e6 weights, K = 250 and 500; writes nothing")
  args = parser.parse_args(argv)
  rec = common.Recorder("compress_algorithms")
  result = run(QUICK if args.quick else FULL, progress=not args.no_progress)
  rec.stop()
  print(table(result))
  if not args.quick:
    print("wrote", rec.write(args.out, {"quick": False, **result}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
