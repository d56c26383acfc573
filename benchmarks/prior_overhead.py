"""Cost of the mixture prior per update: time and peak memory.

    python -m benchmarks.prior_overhead [--quick] [--out DIR]

For a pytree of n weights (four kernels; n = 1e6 and 1e7, or 1e5 with
``--quick``) and K = 17 and 64 components (16 and 63 free plus the zero
component), three variants of one jitted training update with fixed gradients:

* ``adam``: ``optax.adam`` alone, the floor;
* ``prior``: ``optax.chain(ss.mixture_prior(...), optax.adam)``, the mixture
  moving with its own optimizer at every step;
* ``naive``: ``optax.adam`` on ``grads + jax.grad`` of the same summed negative
  log prior written directly with ``logsumexp`` over an (n, K) array (the
  mixture held fixed, so this is a lower bound on the naive cost).

Each variant runs in its own process, so its peak memory is its own: on CPU
the growth of the process's peak resident set over what it held once params,
gradients and optimizer state existed; on GPU the device's peak bytes in use
over the bytes in use at that point. Times are medians of several updates after
a warm-up (compilation). Ratios are measured in the same run.

Writes ``<out>/prior_overhead_<backend>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from benchmarks import _common

COMPONENTS = (17, 64)
VARIANTS = ("adam", "prior", "naive")
STRENGTH = 1e-6


def _params(n: int):
  import jax
  import jax.numpy as jnp

  cols = 1000
  rows = max(1, n // (4 * cols))
  keys = jax.random.split(jax.random.key(0), 4)
  return {f"layer{i}": {"kernel": 0.05 * jax.random.normal(k, (rows, cols), jnp.float32)} for i, k in enumerate(keys)}


def _peak_bytes(backend: str) -> int:
  import jax

  if backend == "cpu":
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  stats = jax.devices()[0].memory_stats() or {}
  return int(stats.get("peak_bytes_in_use", 0))


def _in_use_bytes(backend: str) -> int:
  import jax

  if backend == "cpu":
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  stats = jax.devices()[0].memory_stats() or {}
  return int(stats.get("bytes_in_use", 0))


def child(variant: str, n: int, k: int) -> dict:
  """One variant in this process: returns its timing and memory."""
  import jax
  import jax.numpy as jnp
  import optax

  import softshare_jax as ss

  backend = jax.default_backend()
  params = _params(n)
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  adam = optax.adam(1e-3)
  if variant == "prior":
    tx = optax.chain(ss.mixture_prior(num_components=k - 1, strength=STRENGTH), adam)
  else:
    tx = adam
  opt_state = tx.init(params)
  flat = jnp.concatenate([p.ravel() for p in jax.tree.leaves(params)])
  mixture = ss.init_mixture(flat, k - 1)

  def naive_penalty(p):
    w = jnp.concatenate([x.ravel() for x in jax.tree.leaves(p)])[:, None]
    log_terms = mixture.log_weights + 0.5 * mixture.log_precisions - 0.5 * jnp.log(2 * jnp.pi) \
        - 0.5 * mixture.precisions * (w - mixture.means) ** 2
    return -STRENGTH * jnp.sum(jax.nn.logsumexp(log_terms, axis=-1))

  @jax.jit
  def step(p, s, g):
    if variant == "naive":
      g = jax.tree.map(jnp.add, g, jax.grad(naive_penalty)(p))
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  jax.block_until_ready((params, grads, opt_state))
  base = _in_use_bytes(backend)
  state = {"p": params, "s": opt_state}

  def run():
    state["p"], state["s"] = step(state["p"], state["s"], grads)
    return state["p"]

  timing, _ = _common.time_call(run, warmup=1, min_repeats=3, max_repeats=10, budget_s=3.0)
  peak = _peak_bytes(backend)
  param_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
  return {
      "variant": variant,
      "n": sum(p.size for p in jax.tree.leaves(params)),
      "components": k,
      "median_ms": timing.median_s * 1e3,
      "timing": timing.to_dict(),
      "extra_peak_bytes": max(0, peak - base),
      "param_bytes": param_bytes,
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="n = 1e5 only")
  parser.add_argument("--out", default=_common.RESULTS_DIR)
  parser.add_argument("--child", nargs=3, metavar=("VARIANT", "N", "K"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    variant, n, k = args.child
    print(json.dumps(child(variant, int(n), int(k))))
    return 0

  import jax

  backend = jax.default_backend()
  sizes = (10**5,) if args.quick else (10**6, 10**7)
  recorder = _common.Recorder("prior_overhead")
  rows = []
  for n in sizes:
    for k in COMPONENTS:
      for variant in VARIANTS:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.prior_overhead", "--child", variant, str(n), str(k)],
            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        if proc.returncode != 0:
          rows.append({"variant": variant, "n": n, "components": k, "error": proc.stderr[-2000:]})
          print(f"{variant} n={n} K={k} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
          continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  {variant:6s} n={row['n']:.0e} K={k}: {row['median_ms']:.3g} ms", flush=True)

  by = {(r["variant"], r["n"], r["components"]): r for r in rows if "error" not in r}
  table = []
  for r in rows:
    if "error" in r:
      continue
    adam = by.get(("adam", r["n"], r["components"]))
    naive = by.get(("naive", r["n"], r["components"]))
    r["ratio_to_adam"] = r["median_ms"] / adam["median_ms"] if adam else None
    r["ratio_to_naive"] = r["median_ms"] / naive["median_ms"] if naive else None
    r["extra_peak_over_params"] = r["extra_peak_bytes"] / r["param_bytes"]
    table.append([f"{r['n']:.0e}", r["components"], r["variant"], _common.fmt_ms(r["median_ms"] / 1e3),
                  _common.fmt_ratio(r["ratio_to_adam"]), _common.fmt_ratio(r["ratio_to_naive"]),
                  f"{r['extra_peak_over_params']:.2f}"])
  print()
  print(_common.format_table(["n", "K", "variant", "ms/update", "/adam", "/naive", "extra peak / params"], table))
  recorder.stop()
  path = recorder.write(args.out, {
      "settings": {"sizes": list(sizes), "components": list(COMPONENTS), "strength": STRENGTH,
                   "memory": "CPU: growth of peak RSS; GPU: peak bytes in use over bytes in use before the first update"},
      "rows": rows,
  }, name=f"prior_overhead_{backend}")
  print(f"\nwrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
