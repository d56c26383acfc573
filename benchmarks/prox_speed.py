"""Speed and accuracy of the weight-sharing prox against a NumPy/SciPy pipeline.

    python -m benchmarks.prox_speed [--full] [--quick] [--out DIR]

For each size d (1e3 .. 1e6; 1e7 with ``--full``; 1e3 and 1e4 with ``--quick``)
and each input below, it times

* ``ss.prox_weight_sharing(x, t, method=m)`` under ``jax.jit`` for m in
  "host", "device" and "auto" (on CPU "auto" is the host method, elsewhere the
  device method; the host method always runs through a host callback);
* the NumPy/SciPy pipeline that the prox is measured against: ``np.argsort``,
  ``x[p].astype(float64)`` minus the ramp ``a(2k − d − 1)``,
  ``scipy.optimize.isotonic_regression(...).x``, scatter back ``out[p] = fit``;
* a bare ``np.sort(x)`` and a jitted ``jnp.sort(x)``, the floor any
  sort-based prox stands on.

Inputs (float32, one group of d weights):

* gaussian: N(0, 0.05²) weights, strength 1e-4 (a training-sized step);
* collapse: the same weights, strength 1e3 (every weight goes to the mean);
* chain: an input whose every pooling merge triggers exactly one more, in
  exact arithmetic: in sorted order v = [M, 0, 1, ..., d − 2] with
  M = 1.01 · d(d + 1)/2, a = M/2, x_k = v_k + a(2k − d − 1), t = a(d − 1),
  scaled by a power of two to |x| <= 1 and shuffled by a fixed permutation;
* ties: N(0, 1) rounded to a grid of 0.25, strength 0.5.

Each row is the median of several timed calls after a warm-up (JAX outputs are
waited for with ``block_until_ready``; the JAX functions are compiled ahead of
time, and the compile time is recorded apart). Ratios are medians divided by
the pipeline's and by ``jnp.sort``'s, on the same input in the same run. The
error of each of our methods is max|ours − pipeline| / (max|x| + t), the
pipeline computing in float64.

Two more sections, in every mode:

* host kernel: ``isotonic.prox_rows_host`` called directly on one row (no JAX,
  no callback) against the pipeline and ``np.sort`` at d = 1e6 (1e5 and 1e6 by
  default, up to 1e7 with ``--full``), every input. The three calls are
  interleaved, and each is also timed in thread CPU time
  (``time.thread_time``: all three run on the calling thread), which other
  processes on a busy machine move less than wall time.
* device memory: ``jax.jit(isotonic.prox_rows_device).lower(x, t).compile()
  .memory_analysis()`` for one float32 row of d = 1e5, 1e6 and 2^23 (a
  (2048, 4096) kernel as one group): temporary bytes over the input's bytes.
  Compile-time facts, the same on every run of one backend and JAX version.

Writes ``<out>/prox_speed_<backend>.json`` (backend = ``jax.default_backend()``)
with ``--full`` only; the other modes print.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize as sp_optimize

import softshare_jax as ss
from softshare_jax import isotonic

from benchmarks import common

SIZES = (10**3, 10**4, 10**5, 10**6)
FULL_SIZES = SIZES + (10**7,)
QUICK_SIZES = (10**3, 10**4)
HOST_SIZES = (10**5, 10**6)
FULL_HOST_SIZES = HOST_SIZES + (10**7,)
QUICK_HOST_SIZES = (10**6,)
MEMORY_SIZES = (10**5, 10**6, 2**23)
INPUTS = ("gaussian", "collapse", "chain", "ties")
HARD_INPUTS = ("collapse", "chain", "ties")
OUR_METHODS = ("host", "device", "auto")
# Rows per case, in print order. "pipeline" is the reference for the ratios.
ROWS = ("pipeline", "np.sort", "jnp.sort") + OUR_METHODS
SEED = 0
# On CPU, the device method on a hard input is skipped when one call is
# expected to take longer than this (estimated from the previous size), and
# timed once only when a call does.
SKIP_S = 20.0
# Float64 pooling rounds are counted up to this (a property of the input).
ROUNDS_CAP = 1000


# ----------------------------------------------------------------------------
# Inputs.


def _chain(d: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
  """The chain input (see the module docstring), float32, and its strength."""
  m = 1.01 * d * (d + 1) / 2
  a = m / 2
  k = np.arange(1, d + 1, dtype=np.float64)
  v = np.arange(d, dtype=np.float64) - 1.0
  v[0] = m
  x = v + a * (2 * k - d - 1)
  t = a * (d - 1)
  # A power of two keeps float32 rounding as it would be unscaled.
  scale = 2.0 ** -math.ceil(math.log2(np.abs(x).max()))
  x = (x * scale)[rng.permutation(d)]
  return x.astype(np.float32), t * scale


def make_input(name: str, d: int) -> tuple[np.ndarray, float]:
  """``(x, strength)`` for one input; the same (name, d) always gives the same x.

  The strength is rounded to float32, the precision the prox takes it in, so
  that the float64 pipeline solves the same problem (on the chain a relative
  change of 1e-8 in t already moves the cluster boundaries).
  """
  x, t = _make_input(name, d)
  return x, float(np.float32(t))


def _make_input(name: str, d: int) -> tuple[np.ndarray, float]:
  rng = np.random.default_rng([SEED, d, INPUTS.index(name)])
  if name in ("gaussian", "collapse"):
    # One stream for both, so collapse uses the same weights as gaussian.
    w = np.random.default_rng([SEED, d]).normal(0.0, 0.05, d).astype(np.float32)
    return w, (1e-4 if name == "gaussian" else 1e3)
  if name == "chain":
    return _chain(d, rng)
  if name == "ties":
    return (np.round(rng.normal(0.0, 1.0, d) * 4) / 4).astype(np.float32), 0.5
  raise ValueError(name)


# ----------------------------------------------------------------------------
# The reference pipeline and what it tells about an input.


def pipeline(x: np.ndarray, t: float) -> np.ndarray:
  """The NumPy/SciPy prox, float64 inside and out."""
  d = x.shape[0]
  p = np.argsort(x)
  v = x[p].astype(np.float64)
  v -= (t / (d - 1)) * np.arange(1 - d, d, 2, dtype=np.float64)
  fit = sp_optimize.isotonic_regression(v).x
  out = np.empty(d, dtype=np.float64)
  out[p] = fit
  return out


def pooling_rounds(x: np.ndarray, t: float, cap: int) -> int:
  """Rounds of parallel pooling the input needs in float64; cap + 1 means "more than cap".

  In each round every block whose mean is below the previous block's merges
  into it (whole runs of violators merge at once), as in the device kernel's
  first phase. A property of the input; the kernel itself computes in float32
  and may settle in a different number of rounds (see :func:`device_path`).
  """
  d = x.shape[0]
  v = np.sort(x).astype(np.float64) - (t / (d - 1)) * np.arange(1 - d, d, 2, dtype=np.float64)
  starts = np.arange(d)
  for r in range(cap + 1):
    sums = np.add.reduceat(v, starts)
    means = sums / np.diff(np.append(starts, d))
    viol = means[:-1] > means[1:]
    if not viol.any():
      return r
    starts = np.concatenate([starts[:1], starts[1:][~viol]])
  return cap + 1


@jax.jit
def _pooling_settles(x: jax.Array, t: jax.Array) -> jax.Array:
  """Does the device kernel's pooling phase (``isotonic.pool``) settle the input by itself?"""
  d = x.shape[-1]
  z = jnp.sort(x)[None]
  a = jnp.reshape(t / (d - 1), (1,))
  y, st = isotonic.pool(isotonic.Segments(z, a), z - isotonic.ramp(d, a), isotonic.POOLING_ROUNDS)
  return ~jnp.any(isotonic.violations(y, st))


def device_path(xj: jax.Array, tj: jax.Array) -> str:
  """"pooling" or "pooling+bounded-depth": the path the device method takes on this backend."""
  return "pooling" if bool(_pooling_settles(xj, tj)) else "pooling+bounded-depth"


# ----------------------------------------------------------------------------
# The measurements.


def _compile(fn, *args):
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def _prox_fn(method):
  return lambda x, t: ss.prox_weight_sharing(x, t, method=method)


def run(sizes, *, min_repeats, max_repeats, budget_s, progress=True):
  """All rows, as a list of dicts."""
  backend = jax.default_backend()
  rows = []
  cases = [(d, name) for d in sizes for name in INPUTS]
  bar = common.progress_bar(cases, "prox_speed", enabled=progress)
  compiled_cache = {}
  last_median = {}  # (input, method) -> (d, median seconds), for the skip estimate.
  for d, name in bar:
    bar.set_postfix_str(f"d={d:.0e} {name}")
    x, t = make_input(name, d)
    xj = jax.device_put(x)
    tj = jax.device_put(np.float32(t))
    scale = float(np.abs(x).max()) + t
    case = {
        "d": d,
        "input": name,
        "strength": t,
        "max_abs_x": float(np.abs(x).max()),
        "pool_rounds_f64": pooling_rounds(x, t, ROUNDS_CAP),
        "device_path": device_path(xj, tj),
    }
    timing = dict(min_repeats=min_repeats, max_repeats=max_repeats, budget_s=budget_s)

    ref_timing, ref = common.time_call(lambda: pipeline(x, t), **timing)
    case["clusters"] = int(np.unique(ref).size)
    results = {"pipeline": (ref_timing, None, None, None)}
    results["np.sort"] = (common.time_call(lambda: np.sort(x), **timing)[0], None, None, None)

    key = ("jnp.sort", d)
    if key not in compiled_cache:
      compiled_cache[key] = _compile(jnp.sort, xj)
    sort_fn, sort_compile = compiled_cache[key]
    results["jnp.sort"] = (common.time_call(lambda: sort_fn(xj), **timing)[0], sort_compile, None, None)

    distinct = {}
    for method in OUR_METHODS:
      hard_device = backend == "cpu" and method == "device" and name in HARD_INPUTS
      prev = last_median.get((name, method))
      if hard_device and prev is not None:
        estimate = prev[1] * (d / prev[0]) * 1.5
        if estimate > SKIP_S:
          note = f"skipped: one call estimated at {estimate:.0f} s from d={prev[0]:.0e} (> {SKIP_S:.0f} s)"
          results[method] = (None, None, None, note)
          continue
      key = (method, d)
      if key not in compiled_cache:
        compiled_cache[key] = _compile(_prox_fn(method), xj, tj)
      fn, compile_s = compiled_cache[key]
      tm, out = common.time_call(
          lambda: fn(xj, tj), **timing, stop_after_s=SKIP_S if hard_device else math.inf
      )
      out = np.asarray(out)
      err = float(np.abs(out.astype(np.float64) - ref).max() / scale)
      distinct[method] = int(np.unique(out).size)
      note = f"one call only (> {SKIP_S:.0f} s)" if len(tm.times_s) == 1 and tm.times_s[0] > SKIP_S else None
      results[method] = (tm, compile_s, err, note)
      last_median[(name, method)] = (d, tm.median_s)

    ref_s = ref_timing.median_s
    sort_s = results["jnp.sort"][0].median_s
    for row in ROWS:
      tm, compile_s, err, note = results[row]
      entry = dict(case, method=row)
      if tm is None:
        entry.update(skipped=True, note=note)
      else:
        entry.update(tm.to_dict())
        entry.update(
            skipped=False,
            ratio_to_pipeline=tm.median_s / ref_s,
            ratio_to_jnp_sort=tm.median_s / sort_s,
        )
        if compile_s is not None:
          entry["compile_s"] = compile_s
        if err is not None:
          entry["rel_err"] = err
          entry["distinct"] = distinct[row]
        if note:
          entry["note"] = note
      rows.append(entry)
    del xj, tj
  return rows


def _interleaved(fns: dict, repeats: int) -> dict:
  """Wall and thread-CPU seconds of each function, calls interleaved; medians and minima."""
  for fn in fns.values():
    fn()  # warm-up
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      w0, c0 = time.perf_counter(), time.thread_time()
      fn()
      cpu[k].append(time.thread_time() - c0)
      wall[k].append(time.perf_counter() - w0)
  return {k: {"median_ms": float(np.median(wall[k])) * 1e3, "min_ms": min(wall[k]) * 1e3,
              "cpu_median_ms": float(np.median(cpu[k])) * 1e3, "cpu_min_ms": min(cpu[k]) * 1e3,
              "times_ms": [s * 1e3 for s in wall[k]], "cpu_times_ms": [s * 1e3 for s in cpu[k]]}
          for k in fns}


def host_rows(sizes, *, repeats: int) -> list[dict]:
  """The C host kernel, called directly, against the pipeline and np.sort (see the docstring)."""
  rows = []
  for d in sizes:
    for name in INPUTS:
      x, t = make_input(name, d)
      xr, tr = x[None], np.array([t])
      fns = {
          "pipeline": lambda: pipeline(x, t),
          "np.sort": lambda: np.sort(x),
          "host_kernel": lambda: isotonic.prox_rows_host(xr, tr),
      }
      res = _interleaved(fns, repeats)
      err = float(np.abs(isotonic.prox_rows_host(xr, tr)[0].astype(np.float64) - pipeline(x, t)).max()
                  / (float(np.abs(x).max()) + t))
      for k, r in res.items():
        rows.append(dict(
            r, d=d, input=name, method=k,
            ratio_to_pipeline=r["median_ms"] / res["pipeline"]["median_ms"],
            cpu_ratio_to_pipeline=r["cpu_median_ms"] / res["pipeline"]["cpu_median_ms"],
            cpu_ratio_to_np_sort=r["cpu_median_ms"] / res["np.sort"]["cpu_median_ms"],
            **({"rel_err": err, "c_kernel": isotonic.host_kernel is not None} if k == "host_kernel" else {}),
        ))
  return rows


def host_table(rows) -> str:
  headers = ("d", "input", "method", "median ms", "cpu ms", "cpu /pipeline", "cpu /np.sort", "rel err")
  lines = [(
      f"{r['d']:.0e}", r["input"], r["method"], common.fmt_ms(r["median_ms"] / 1e3),
      common.fmt_ms(r["cpu_median_ms"] / 1e3), common.fmt_ratio(r["cpu_ratio_to_pipeline"]),
      common.fmt_ratio(r["cpu_ratio_to_np_sort"]), f"{r['rel_err']:.1e}" if "rel_err" in r else "",
  ) for r in rows]
  return common.format_table(headers, lines, align="><<>>>>>")


def memory_rows(sizes) -> list[dict]:
  """Compiled memory of the device kernel on one float32 row of each size."""
  rows = []
  for d in sizes:
    x = jax.ShapeDtypeStruct((1, d), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    start = time.perf_counter()
    mem = jax.jit(isotonic.prox_rows_device).lower(x, t).compile().memory_analysis()
    compile_s = time.perf_counter() - start
    input_bytes = d * 4
    rows.append({
        "d": d,
        "input_bytes": input_bytes,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_over_input": mem.temp_size_in_bytes / input_bytes,
        "compile_s": compile_s,
    })
  return rows


def memory_table(rows) -> str:
  lines = [(f"{r['d']:.3g}", f"{r['input_bytes'] / 2**20:.1f}", f"{r['temp_bytes'] / 2**20:.1f}",
            f"{r['temp_over_input']:.1f}", f"{r['compile_s']:.1f}") for r in rows]
  return common.format_table(("d", "input MiB", "temp MiB", "temp / input", "compile s"), lines, align=">>>>>")


def table(rows) -> str:
  headers = ("d", "input", "method", "median ms", "/pipeline", "/jnp.sort", "rel err", "distinct", "compile s", "note")
  lines = []
  for r in rows:
    skipped = r.get("skipped")
    lines.append((
        f"{r['d']:.0e}",
        r["input"],
        r["method"],
        "-" if skipped else common.fmt_ms(r["median_ms"] / 1e3),
        "-" if skipped else common.fmt_ratio(r["ratio_to_pipeline"]),
        "-" if skipped else common.fmt_ratio(r["ratio_to_jnp_sort"]),
        f"{r['rel_err']:.1e}" if "rel_err" in r else "",
        str(r["distinct"]) if "distinct" in r else "",
        f"{r['compile_s']:.2f}" if "compile_s" in r else "",
        r.get("note") or "",
    ))
  return common.format_table(headers, lines, align="><<>>>>>><")


def cases_table(rows) -> str:
  seen, lines = set(), []
  for r in rows:
    key = (r["d"], r["input"])
    if key in seen:
      continue
    seen.add(key)
    rounds = r["pool_rounds_f64"]
    lines.append((
        f"{r['d']:.0e}",
        r["input"],
        f"{r['strength']:.3g}",
        str(r["clusters"]),
        f"> {ROUNDS_CAP}" if rounds > ROUNDS_CAP else str(rounds),
        r["device_path"] or "?",
    ))
  return common.format_table(
      ("d", "input", "strength", "clusters", "f64 pooling rounds", "device method path"), lines, align="><>>><"
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.prox_speed", description=__doc__.split("\n")[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--full", action="store_true", help="add d = 1e7 and write the JSON")
  mode.add_argument("--quick", action="store_true",
                    help="d in {1e3, 1e4}, host kernel at 1e6, few repeats (smoke test)")
  parser.add_argument("--out", default=common.RESULTS_DIR, help="directory for the JSON (default: %(default)s)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)

  if args.quick:
    mode_name, sizes, reps = "quick", QUICK_SIZES, dict(min_repeats=2, max_repeats=3, budget_s=0.2)
    host_sizes, host_repeats = QUICK_HOST_SIZES, 5
  else:
    mode_name = "full" if args.full else "default"
    sizes = FULL_SIZES if args.full else SIZES
    reps = dict(min_repeats=3, max_repeats=15, budget_s=1.5)
    host_sizes, host_repeats = (FULL_HOST_SIZES if args.full else HOST_SIZES), 9

  backend = jax.default_backend()
  recorder = common.Recorder("prox_speed", ("tqdm",))
  machine = recorder.machine
  rows = run(sizes, progress=not args.no_progress, **reps)
  hrows = host_rows(host_sizes, repeats=host_repeats)
  mrows = memory_rows(MEMORY_SIZES)
  elapsed = recorder.stop()

  print(f"prox_weight_sharing speed, backend={backend}, mode={mode_name}, {elapsed:.0f} s")
  load = machine.get("loadavg_1_5_15")
  if load:
    print(f"load average before the run: {load[0]:.2f} (1 min), {machine.get('cpus_usable')} usable CPUs")
  print()
  print(cases_table(rows))
  print()
  print(table(rows))
  print()
  print(
      "median ms: median wall time of one call; /pipeline and /jnp.sort: that median over the "
      "NumPy/SciPy pipeline's and jnp.sort's on the same input; rel err: max|ours - pipeline| / "
      "(max|x| + t); distinct: distinct values in our output; clusters: distinct values of the "
      "float64 pipeline's prox; f64 pooling rounds: rounds of parallel pooling the input needs in "
      "float64; device method path: whether the device kernel's float32 pooling "
      f"({isotonic.POOLING_ROUNDS} rounds) settles the input or its bounded-depth pass runs."
  )
  print(f"\nHost kernel called directly (C kernel built: {isotonic.host_kernel is not None}), "
        f"{host_repeats} interleaved calls each:\n")
  print(host_table(hrows))
  print("\ncpu ms: median thread CPU time of one call; cpu /pipeline, cpu /np.sort: over theirs, same input, same run.")
  print("\nDevice kernel memory (one float32 row, compiled on this backend):\n")
  print(memory_table(mrows))
  if not args.full:
    print(f"\n{mode_name} mode: nothing written (the JSON is written with --full only).")
    return 0

  path = recorder.write(args.out, {
      "loadavg_after_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "settings": {
          "mode": mode_name,
          "sizes": list(sizes),
          "inputs": {
              "gaussian": "float32 N(0, 0.05^2), strength 1e-4",
              "collapse": "same weights as gaussian, strength 1e3",
              "chain": (
                  "sorted-order v = [M, 0, 1, ..., d-2], M = 1.01 d(d+1)/2, a = M/2, "
                  "x_k = v_k + a(2k-d-1), t = a(d-1); x and t scaled by a power of two "
                  "to max|x| <= 1, x shuffled by a fixed permutation, cast to float32"
              ),
              "ties": "float32 round(4 N(0,1))/4, strength 0.5",
          },
          "rows": {
              "pipeline": "np.argsort; x[p].astype(float64) - a(2k-d-1); "
                          "scipy.optimize.isotonic_regression(...).x; out[p] = fit",
              "np.sort": "np.sort(x)",
              "jnp.sort": "jax.jit(jnp.sort)(x)",
              "host/device/auto": "jax.jit(lambda x, t: ss.prox_weight_sharing(x, t, method=m)), "
                                  "compiled ahead of time (compile_s)",
          },
          "timing": dict(reps, warmup=1, statistic="median", timer="time.perf_counter",
                         sync="jax.block_until_ready"),
          "ratios": "row median / pipeline median and / jnp.sort median, same input, same run",
          "rel_err": "max|ours - pipeline (float64)| / (max|x| + t)",
          "skip_rule": (
              f"backend cpu, method device, inputs {list(HARD_INPUTS)}: skipped when one call is "
              f"estimated over {SKIP_S:.0f} s (previous size's median x size ratio x 1.5); "
              f"timed once when one call takes over {SKIP_S:.0f} s"
          ),
          "device_pooling_rounds": isotonic.POOLING_ROUNDS,
          "f64_pooling_rounds_cap": ROUNDS_CAP,
          "distinct": "distinct values in our method's output (sharing_stats counts these)",
          "clusters": "distinct values of the float64 pipeline's prox",
          "device_path": "from the device kernel's own pooling phase, jitted on this backend (diagnostic)",
          "host_rows": "isotonic.prox_rows_host(x[None], [t]) called directly, against pipeline and np.sort; "
                       f"{host_repeats} interleaved calls after one warm-up; wall (perf_counter) and "
                       "thread CPU (thread_time) medians; ratios of medians, same input, same run",
          "memory_rows": "jax.jit(isotonic.prox_rows_device).lower((1, d) f32, (1,) f32).compile()"
                         ".memory_analysis(): temp_size_in_bytes / (4 d)",
          "seed": SEED,
          "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS", "OMP_NUM_THREADS")},
      },
      "rows": rows,
      "host_rows": hrows,
      "memory_rows": mrows,
  }, name=f"prox_speed_{backend}")
  print(f"\nwrote {path} ({elapsed:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
