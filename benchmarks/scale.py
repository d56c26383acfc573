"""Scale: every transform from 1e5 to 1e8 params, on 1 and 8 devices, 1 and 100 leaves; compression at model size.

    python -m benchmarks.scale [--quick] [--out DIR] [--section {steps,compress,prox}]

Three sections, each against a baseline measured in the same run:

* ``steps``: one jitted training step ``params, state = step(params, state,
  grads)`` per transform (``adam`` alone; the mixture prior, gradient and em,
  before adam; the prox after adam, per column (``axis=0``, groups unsharded)
  and whole-leaf; ``soft_tie``, ``hard_tie``; ``keep_clusters``), for n =
  1e5 ... 1e8 params in one kernel (and 1e6 in 100 kernels), on 1 device or FSDP-sharded
  over 8 (each kernel split along its columns). Reported: the median step time
  and its ratio to ``adam`` on the same params; the compiled step's temporary
  bytes per device (``memory_analysis()``) and their ratio to the device's
  own param bytes; the largest array any collective of the step moves, as a
  fraction of a leaf (1.0: a whole leaf was gathered). The ties tie the
  kernels in pairs (the one-leaf rows use two kernels of n/2). On a CPU host
  the 8 devices share its cores: the 8-device times say nothing about speed,
  the memory and collectives columns are what they measure.
* ``compress``: at 8 x 2048 x 2048 = 3.4e7 weights, the mixture pipeline
  (init, merge, quantize, report, save, load, dequantize) and
  ``cluster_weights(16)``, each stage's time against one ``np.sort`` of the
  same weights and its extra peak memory (growth of the process's peak RSS,
  the high-water mark reset before each stage) over the params' bytes; the
  pipeline runs twice, cold (compiling) and warm. Runs in a child process.
* ``prox``: the host kernel (``method="host"``) on one group of d = 1e6 and
  1e7 against the plain NumPy/SciPy pipeline (argsort, SciPy isotonic
  regression, scatter back) and ``np.sort`` of the same float32 values.

``--quick`` (the test): 1e5 params, one transform of each kind, 1e6 weights
for compression, d = 1e5 for the prox. Writes ``<out>/scale.json`` (quick:
``scale_quick.json``) and, full, ``scale.png``.
"""

from __future__ import annotations

import os

# Eight host devices for the sharded rows; set before JAX creates its backend.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import json
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import common

SIZES = (10**5, 10**6, 10**7, 10**8)
QUICK_SIZES = (10**5,)
# 1e8 params: the floor, the prior and the per-column prox, one leaf, sharded (the FSDP case).
LARGEST_ONLY = ("adam", "prior", "prox_axis0")
MANY_LEAVES_SIZE = 10**6  # the 1-vs-100-leaves comparison (full run)
TRANSFORMS = ("adam", "prior", "prior_em", "prox_axis0", "prox_whole", "prox_axis0_device", "soft_tie", "hard_tie",
              "keep_clusters")
QUICK_TRANSFORMS = ("adam", "prior", "prox_axis0", "soft_tie", "keep_clusters")
# Quick: 100 leaves on one device only; the ties and keep_clusters only sharded, one leaf.
QUICK_SHARDED_ONLY = ("soft_tie", "keep_clusters")
LEARNING_RATE = 1e-3
COMPRESS_LEAVES, COMPRESS_SIDE = 8, 2048
# "%name = <shape or (tuple of shapes)> <collective>(" in the compiled module's text.
_COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-gather|all-to-all|collective-permute|all-reduce)(?:-start)?\(")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


# ----------------------------------------------------------------------------
# Steps.


def kernel_shapes(n: int, leaves: int) -> list[tuple[int, int]]:
  """``leaves`` kernels of about n/leaves weights each, columns a multiple of 8 (they are sharded)."""
  m = max(1, n // leaves)
  cols = max(8, 8 * round(np.sqrt(m) / 8))
  return [(max(1, m // cols), cols)] * leaves


def make_params(n: int, leaves: int) -> dict:
  rng = np.random.default_rng(0)
  # Weights on a grid of 1/32: keep_clusters needs a quantized tree (at most 256 values per leaf).
  return {f"k{i:03d}": (np.round(rng.normal(0.0, 0.05, s) * 32) / 32).astype(np.float32)
          for i, s in enumerate(kernel_shapes(n, leaves))}


def build(name: str, params: dict):
  import optax

  import softshare_jax as ss

  adam = optax.adam(LEARNING_RATE)
  names = sorted(params)
  pairs = [[a, b] for a, b in zip(names[::2], names[1::2])]
  if name == "adam":
    return adam
  if name in ("prior", "prior_em"):
    update = "em" if name == "prior_em" else "gradient"
    return optax.chain(ss.mixture_prior(16, 1e-6, mixture_update=update), adam)
  if name.startswith("prox"):
    method = "device" if name.endswith("device") else "auto"
    return optax.chain(adam, ss.weight_sharing_prox(1e-3, LEARNING_RATE, axis=None if "whole" in name else 0,
                                                    method=method))
  if name == "soft_tie":
    return optax.chain(ss.soft_tie(pairs, 0.1), adam)
  if name == "hard_tie":
    return optax.chain(ss.hard_tie(pairs), adam)
  if name == "keep_clusters":
    return optax.chain(ss.keep_clusters(ss.quantize(params, None)), adam)
  raise ValueError(f"unknown transform {name!r}")


def collectives(hlo: str) -> list[tuple[str, int]]:
  """(kind, elements of its largest result) of every collective in a compiled module's text."""
  out = []
  for shapes, kind in _COLLECTIVE.findall(hlo):
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) for dims in _SHAPE.findall(shapes)]
    out.append((kind, max(sizes, default=0)))
  return out


def step_row(name: str, n: int, devices: int, leaves: int) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import softshare_jax as ss

  host = make_params(n, 2 if name in ("soft_tie", "hard_tie") and leaves == 1 else leaves)
  if name == "hard_tie":
    host = ss.sync(host, [[a, b] for a, b in zip(sorted(host)[::2], sorted(host)[1::2])])
  mesh = Mesh(np.array(jax.devices()[:devices]), ("x",))
  shard = NamedSharding(mesh, P(None, "x"))
  params = {k: jax.device_put(jnp.asarray(v), shard) for k, v in host.items()}
  grads = {k: jax.device_put(jnp.full(v.shape, 1e-3, jnp.float32), shard) for k, v in host.items()}
  tx = build(name, host)
  # An optimizer state built by jit comes out on one device (zeros depend on no input's values):
  # shard what has a kernel's shape like the kernels (FSDP), replicate the rest.
  state = jax.tree.map(lambda a: jax.device_put(a, shard if np.ndim(a) == 2 else NamedSharding(mesh, P())),
                       jax.jit(tx.init)(params))

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  in_sh = jax.tree.map(lambda a: a.sharding, (params, state))
  free = jax.jit(step).lower(params, state, grads).compile()
  # Whether the step hands back params and state sharded as they came (the update kept the layout).
  kept = all(a.is_equivalent_to(b, np.ndim(x)) for a, b, x in zip(
      jax.tree.leaves(free.output_shardings), jax.tree.leaves(in_sh), jax.tree.leaves((params, state))))
  # Jitted as a training loop is: outputs constrained to the inputs' shardings, so steps chain.
  compiled = jax.jit(step, out_shardings=in_sh).lower(params, state, grads).compile()
  mem = compiled.memory_analysis()
  leaf_elems = max(v.size for v in host.values())
  moved = [e for _, e in collectives(compiled.as_text())]
  box = {"p": params, "s": state}

  def run():
    box["p"], box["s"] = compiled(box["p"], box["s"], grads)
    return box["p"]

  timing, _ = common.time_call(run, warmup=1, min_repeats=3, max_repeats=7, budget_s=2.0, stop_after_s=20.0)
  param_bytes_per_device = sum(v.nbytes for v in host.values()) / devices
  return {
      "transform": name, "n": int(sum(v.size for v in host.values())), "devices": devices, "leaves": len(host),
      "n_target": n, "leaves_target": leaves,
      "median_ms": timing.median_s * 1e3, "timing": timing.to_dict(),
      "temp_bytes_per_device": int(mem.temp_size_in_bytes),
      "temp_over_device_params": mem.temp_size_in_bytes / param_bytes_per_device,
      "collectives": len(moved), "sharding_kept": bool(kept),
      "largest_collective_over_leaf": (max(moved) / leaf_elems) if moved else 0.0,
  }


def steps_section(quick: bool, progress: bool, only: tuple[str, ...] = ()) -> list[dict]:
  rows = []
  sizes = QUICK_SIZES if quick else SIZES
  names = QUICK_TRANSFORMS if quick else TRANSFORMS
  plan = []
  for n in sizes:
    for devices in (1, 8):
      for leaves in (1, 100):
        for name in names:
          if n == 10**8 and (name not in LARGEST_ONLY or devices == 1 or leaves != 1):
            continue
          if not quick and leaves == 100 and n != MANY_LEAVES_SIZE:
            continue
          if quick and (name in QUICK_SHARDED_ONLY and (devices == 1 or leaves != 1)
                        or devices == 8 and leaves != 1):
            continue
          plan.append((name, n, devices, leaves))
  for name, n, devices, leaves in common.progress_bar(plan, desc="steps", enabled=progress):
    if only and name not in only:
      continue
    print(f"# {name} n={n:.0e} devices={devices} leaves={leaves}", file=sys.stderr, flush=True)
    rows.append(step_row(name, n, devices, leaves))
  # Against adam on the same configuration (the ties' one-leaf rows hold two kernels of n/2).
  base = {(r["n_target"], r["devices"], r["leaves_target"]): r for r in rows if r["transform"] == "adam"}
  for r in rows:
    ref = base.get((r["n_target"], r["devices"], r["leaves_target"]))
    r["ratio_to_adam"] = r["median_ms"] / ref["median_ms"] if ref else None
  return rows


# ----------------------------------------------------------------------------
# Compression (a child process: its peak memory is its own).


def _reset_peak() -> None:
  """Resets the kernel's high-water mark of this process's resident memory (Linux)."""
  with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
    f.write("5")


def _peak_rss() -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def compress_child(n_leaves: int, side: int) -> dict:
  """The pipeline twice on the same weights: cold (compiling) and warm; time and peak memory per stage."""
  import jax
  import jax.numpy as jnp

  import softshare_jax as ss

  rng = np.random.default_rng(0)
  params = {f"k{i}": jnp.asarray(rng.normal(0.0, 0.05, (side, side)).astype(np.float32)) for i in range(n_leaves)}
  flat = np.concatenate([np.asarray(v).ravel() for v in params.values()])
  param_bytes = flat.nbytes
  jax.block_until_ready(params)
  runs = []
  for _ in range(2):
    seconds, peak = {}, {}

    def timed(stage, fn):
      _reset_peak()
      base = _peak_rss()
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn())
      seconds[stage] = time.perf_counter() - t0
      peak[stage] = max(0, _peak_rss() - base)  # a page's worth below 0 when the call freed memory
      return out

    timed("np_sort", lambda a=flat: np.sort(a))
    mixture = timed("init", lambda: ss.init_mixture(params, 16))
    merged = timed("merge", lambda: ss.merge_components(mixture, 1e-2))
    q = timed("quantize", lambda: ss.quantize(params, merged))
    timed("report", lambda: ss.compression_report(q))
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "q.safetensors")
      timed("save", lambda: ss.save_quantized(path, q))
      loaded = timed("load", lambda: ss.load_quantized(path))
    timed("dequantize", lambda: ss.dequantize(loaded))
    timed("cluster_weights", lambda: ss.cluster_weights(params, 16, key=jax.random.key(0)))
    runs.append({"seconds": seconds, "extra_peak_bytes": peak})
  return {"weights": n_leaves * side * side, "param_bytes": param_bytes, "cold": runs[0], "warm": runs[1]}


PIPELINE = ("init", "merge", "quantize", "report", "save", "load", "dequantize")


def compress_section(quick: bool) -> dict:
  leaves, side = (4, 512) if quick else (COMPRESS_LEAVES, COMPRESS_SIDE)
  out = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--compress-child", str(leaves), str(side)],
                       capture_output=True, text=True, check=True, timeout=3600)
  res = json.loads(out.stdout.strip().splitlines()[-1])
  for run in (res["cold"], res["warm"]):
    sec = run["seconds"]
    run["ratio_to_sort"] = {s: sec[s] / sec["np_sort"] for s in sec}
    run["pipeline_s"] = sum(sec[s] for s in PIPELINE)
    run["pipeline_ratio_to_sort"] = run["pipeline_s"] / sec["np_sort"]
    run["extra_peak_over_params"] = {s: b / res["param_bytes"] for s, b in run["extra_peak_bytes"].items()}
    run["pipeline_extra_peak_over_params"] = max(run["extra_peak_over_params"][s] for s in PIPELINE)
  return res


# ----------------------------------------------------------------------------
# The prox host kernel.


def prox_section(quick: bool) -> list[dict]:
  from softshare_jax import isotonic

  rows = []
  for d in (10**5,) if quick else (10**6, 10**7):
    x = np.random.default_rng(1).normal(0.0, 1.0, (1, d)).astype(np.float32)
    t = np.array([1e-3 * np.sqrt(d)], np.float32)
    cases = {"np.sort": lambda: np.sort(x, axis=1),
             "numpy_scipy": lambda: isotonic.prox_rows_numpy(x, t),
             "host_kernel": lambda: isotonic.prox_rows_host(x, t)}
    times = {k: common.time_call(f, warmup=1, min_repeats=3, max_repeats=7, budget_s=2.0, sync=lambda o: o)[0]
             for k, f in cases.items()}
    for k, tm in times.items():
      rows.append({"d": d, "kernel": k, "median_ms": tm.median_s * 1e3,
                   "ratio_to_numpy_scipy": tm.median_s / times["numpy_scipy"].median_s,
                   "ratio_to_sort": tm.median_s / times["np.sort"].median_s})
  return rows


# ----------------------------------------------------------------------------
# Output.


def tables(result: dict) -> str:
  parts = []
  if result.get("steps"):
    parts.append(common.format_table(
        ["transform", "n", "dev", "leaves", "step", "x adam", "temp/dev params", "collectives", "max moved/leaf"],
        [[r["transform"], f"{r['n']:.0e}", r["devices"], r["leaves"], common.fmt_ms(r["median_ms"] / 1e3),
          common.fmt_ratio(r["ratio_to_adam"]), f"{r['temp_over_device_params']:.2f}", r["collectives"],
          f"{r['largest_collective_over_leaf']:.3f}"] for r in result["steps"]]))
  if result.get("compress"):
    c = result["compress"]
    cold, warm = c["cold"], c["warm"]
    parts.append(common.format_table(
        ["stage", "cold s", "warm s", "warm x np.sort", "peak / params"],
        [[s, f"{cold['seconds'][s]:.3f}", f"{warm['seconds'][s]:.3f}", f"{warm['ratio_to_sort'][s]:.1f}",
          f"{warm['extra_peak_over_params'][s]:.2f}"] for s in warm["seconds"]]
        + [["pipeline", f"{cold['pipeline_s']:.3f}", f"{warm['pipeline_s']:.3f}",
            f"{warm['pipeline_ratio_to_sort']:.1f}", f"{warm['pipeline_extra_peak_over_params']:.2f}"]]))
    parts.append(f"weights {c['weights']:.2e}; cold = first call (compiles), warm = the same again")
  if result.get("prox"):
    parts.append(common.format_table(
        ["d", "kernel", "ms", "x numpy/scipy", "x np.sort"],
        [[f"{r['d']:.0e}", r["kernel"], f"{r['median_ms']:.1f}", f"{r['ratio_to_numpy_scipy']:.2f}",
          f"{r['ratio_to_sort']:.2f}"] for r in result["prox"]]))
  return "\n\n".join(parts)


def draw(steps: list[dict], axes) -> None:
  """Step time over adam's and per-device temporaries over the device's params, against n (one leaf)."""
  for name in sorted({r["transform"] for r in steps} - {"adam"}):
    for devices, style in ((1, "-"), (8, "--")):
      rows = sorted((r for r in steps if r["transform"] == name and r["devices"] == devices
                     and r["leaves_target"] == 1), key=lambda r: r["n"])
      if rows:
        label = f"{name} ({devices} dev)"
        axes[0].plot([r["n"] for r in rows], [r["ratio_to_adam"] for r in rows], style, marker="o", label=label)
        axes[1].plot([r["n"] for r in rows], [r["temp_over_device_params"] for r in rows], style, marker="o",
                     label=label)
  axes[0].set(xscale="log", yscale="log", xlabel="params", ylabel="step time / adam alone", title="step time")
  axes[1].set(xscale="log", yscale="log", xlabel="params", ylabel="temp bytes / device's param bytes",
              title="per-device temporaries (compiled)")
  axes[1].axhline(4, color="gray", lw=0.8)
  axes[1].legend(fontsize=6, ncol=2)


def plot(result: dict, path: str) -> str:
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  draw(result["steps"], axes)
  fig.tight_layout()
  return common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["--compress-child"]:
    print(json.dumps(compress_child(int(argv[1]), int(argv[2]))))
    return 0
  parser = common.argument_parser("scale", __doc__, "1e5 params, a few transforms, small compression and prox")
  parser.add_argument("--section", choices=("steps", "compress", "prox"), action="append",
                      help="run only these sections (repeatable; default: all)")
  parser.add_argument("--transform", action="append", choices=TRANSFORMS, help="only these transforms (repeatable)")
  args = parser.parse_args(argv)
  sections = args.section or ["steps", "compress", "prox"]
  recorder = common.Recorder("scale")
  result = {"settings": {"quick": args.quick, "sections": sections, "sizes": QUICK_SIZES if args.quick else SIZES,
                         "learning_rate": LEARNING_RATE}}
  if "steps" in sections:
    result["steps"] = steps_section(args.quick, not args.no_progress, tuple(args.transform or ()))
  if "compress" in sections:
    result["compress"] = compress_section(args.quick)
  if "prox" in sections:
    result["prox"] = prox_section(args.quick)
  recorder.stop()
  name = "scale_quick" if args.quick else "scale"
  previous = os.path.join(args.out, f"{name}.json")
  if args.section and os.path.exists(previous):
    # A rerun of some sections keeps the others' last results (their own head is lost: noted).
    with open(previous, encoding="utf-8") as f:
      old = json.load(f)
    for key in ("steps", "compress", "prox"):
      if key not in result and key in old:
        result[key] = old[key]
        result["settings"].setdefault("kept_from_previous_run", []).append(
            {"section": key, "created_utc": old.get("created_utc")})
  print(tables(result))
  print("wrote", recorder.write(args.out, result, name=name))
  if not args.quick and result.get("steps"):
    print("wrote", plot(result, os.path.join(args.out, "scale.png")))
  return 0


if __name__ == "__main__":
  sys.exit(main())
