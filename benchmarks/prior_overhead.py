"""Cost of the mixture prior per update: time and memory.

    python -m benchmarks.prior_overhead [--quick] [--out DIR]

For a pytree of n weights (four kernels; n = 1e6 and 4e6, or 4e6 alone with
``--quick``) and K = 17 and 64 components (16 and 63 free plus the zero
component; K = 64 alone with ``--quick``), four variants of one jitted
training update with fixed gradients:

* ``adam``: ``optax.adam`` alone, the floor;
* ``prior``: ``optax.chain(ss.mixture_prior(...), optax.adam)``, the mixture
  moving with its own optimizer (``mixture_update="gradient"``);
* ``prior_em``: the same with ``mixture_update="em"``;
* ``naive``: the same math written directly: ``jax.grad`` of the summed
  negative log prior −Σ_i log Σ_j π_j N(w_i | μ_j, 1/λ_j) (a ``logsumexp``
  over an (n, K) array) with respect to the weights AND the mixture, the
  weights' part added to the gradients before ``optax.adam``, the mixture's
  part applied with ``ss.mixture_adam``.

Then many small leaves against one leaf of the same size (K = 17): 100
kernels of 64 × 64 against one of 640 × 640 (409,600 weights each), ``adam``
and ``prior``; the prior's overhead over Adam is compared.

Times are the medians (and minima) of several updates after a warm-up
(compilation), the variants of one configuration timed in turn, round after
round, in the same process, so that a load from other processes hits them
alike; ratios are taken within a configuration, of medians and of minima
(the minima are the less sensitive to a shared machine). Memory is XLA's own account
of the compiled update, ``memory_analysis().temp_size_in_bytes`` (the
temporaries beyond the arguments and outputs), reported over the params'
bytes; the prior's extra memory is its temporaries minus Adam's.

Writes ``<out>/prior_overhead_<backend>.json`` (only without ``--quick``).
"""

from __future__ import annotations

import statistics
import sys
import time

from benchmarks import common

COMPONENTS = (17, 64)
SIZES = (10**6, 4 * 10**6)
VARIANTS = ("adam", "prior", "prior_em", "naive")
STRENGTH = 1e-6
LEAVES = {"100 x 64x64": (100, (64, 64)), "1 x 640x640": (1, (640, 640))}
LEAVES_COMPONENTS = 17


def _kernels(count: int, shape: tuple[int, ...]):
  import jax
  import jax.numpy as jnp

  keys = jax.random.split(jax.random.key(0), count)
  return {f"layer{i}": {"kernel": 0.05 * jax.random.normal(k, shape, jnp.float32)} for i, k in enumerate(keys)}


def _params(n: int):
  cols = 1000
  return _kernels(4, (max(1, n // (4 * cols)), cols))


def _step(variant: str, params, k: int):
  """The jitted update of ``variant`` and its initial state."""
  import jax
  import jax.numpy as jnp
  import optax

  import softshare_jax as ss

  adam = optax.adam(1e-3)
  if variant in ("prior", "prior_em"):
    mode = "em" if variant == "prior_em" else "gradient"
    tx = optax.chain(ss.mixture_prior(num_components=k - 1, strength=STRENGTH, mixture_update=mode), adam)
  else:
    tx = adam
  if variant != "naive":
    @jax.jit
    def step(p, s, g):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s

    return step, tx.init(params)

  flat = jnp.concatenate([p.ravel() for p in jax.tree.leaves(params)])
  mixture = ss.init_mixture(flat, k - 1)
  mix_tx = ss.mixture_adam()

  def penalty(x, m):
    log_terms = (m.log_weights + 0.5 * m.log_precisions - 0.5 * jnp.log(2 * jnp.pi)
                 - 0.5 * m.precisions * (x[..., None] - m.means) ** 2)
    return -STRENGTH * jnp.sum(jax.nn.logsumexp(log_terms, axis=-1))

  @jax.jit
  def naive_step(p, s, g):
    adam_state, m, mix_state = s
    # One kernel at a time (they have one shape; lax.map is a loop), so that a
    # kernel's (size, K) arrays, not the whole tree's (n, K), are the largest:
    # XLA keeps all of those alive at once, 256x the params' bytes (4 GB at
    # n = 4e6, K = 64).
    leaves, treedef = jax.tree.flatten(p)

    def one(x):
      return jax.grad(penalty, argnums=(0, 1))(x, m)

    gx, gm = jax.lax.map(one, jnp.stack(leaves))
    gm = jax.tree.map(lambda a: jnp.sum(a, axis=0), gm)
    updates, adam_state = adam.update(jax.tree.map(jnp.add, g, treedef.unflatten(list(gx))), adam_state, p)
    steps, mix_state = mix_tx.update(gm, mix_state, m)
    return optax.apply_updates(p, updates), (adam_state, optax.apply_updates(m, steps), mix_state)

  return naive_step, (adam.init(params), mixture, mix_tx.init(mixture))


def measure(params, k: int, variants, rounds: int, budget_s: float) -> list[dict]:
  """Compiles each variant's update, then times them in turn, round after round."""
  import jax
  import jax.numpy as jnp

  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  param_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
  runs = {}
  for v in variants:
    step, state = _step(v, params, k)
    compiled = step.lower(params, state, grads).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(params, state, grads))
    runs[v] = {"fn": compiled, "state": out, "warmup_s": time.perf_counter() - start, "times": [], "temp": temp}
  spent, done = 0.0, 0
  while done < rounds or (spent < budget_s and done < 3 * rounds):
    for v, r in runs.items():
      p, s = r["state"]
      start = time.perf_counter()
      r["state"] = jax.block_until_ready(r["fn"](p, s, grads))
      r["times"].append(time.perf_counter() - start)
      spent += r["times"][-1]
    done += 1
  rows = []
  base = runs.get("adam")
  for v, r in runs.items():
    median = statistics.median(r["times"])
    row = {
        "variant": v, "n": sum(p.size for p in jax.tree.leaves(params)), "components": k,
        "leaves": len(jax.tree.leaves(params)), "median_ms": median * 1e3, "min_ms": min(r["times"]) * 1e3,
        "times_ms": [t * 1e3 for t in r["times"]], "warmup_ms": r["warmup_s"] * 1e3,
        "temp_bytes": r["temp"], "param_bytes": param_bytes,
        "extra_peak_bytes": r["temp"], "extra_peak_over_params": r["temp"] / param_bytes,
    }
    if base is not None:
      row["extra_over_adam_bytes"] = r["temp"] - base["temp"]
      row["extra_over_adam_over_params"] = (r["temp"] - base["temp"]) / param_bytes
      row["overhead_ms"] = (median - statistics.median(base["times"])) * 1e3
      row["overhead_min_ms"] = (min(r["times"]) - min(base["times"])) * 1e3
    rows.append(row)
  by = {r["variant"]: r for r in rows}
  for r in rows:
    r["ratio_to_adam"] = r["median_ms"] / by["adam"]["median_ms"] if "adam" in by else None
    r["ratio_to_naive"] = r["median_ms"] / by["naive"]["median_ms"] if "naive" in by else None
    r["ratio_to_naive_min"] = r["min_ms"] / by["naive"]["min_ms"] if "naive" in by else None
  return rows


def main(argv: list[str] | None = None) -> int:
  parser = common.argument_parser("prior_overhead", __doc__, "n = 4e6 and K = 64 only, fewer rounds; no JSON")
  args = parser.parse_args(argv)

  import jax

  backend = jax.default_backend()
  sizes = (4 * 10**6,) if args.quick else SIZES
  components = (64,) if args.quick else COMPONENTS
  rounds, budget = (3, 10.0) if args.quick else (5, 30.0)
  recorder = common.Recorder("prior_overhead")
  rows = []
  for n in sizes:
    for k in components:
      rows += measure(_params(n), k, VARIANTS, rounds, budget)
      print(f"  n={n:.0e} K={k} done", flush=True)
  table = [[f"{r['n']:.0e}", r["components"], r["variant"], common.fmt_ms(r["median_ms"] / 1e3),
            common.fmt_ratio(r["ratio_to_adam"]), common.fmt_ratio(r["ratio_to_naive"]),
            common.fmt_ratio(r["ratio_to_naive_min"]), f"{r['extra_over_adam_over_params']:.2f}"] for r in rows]
  print()
  print(common.format_table(["n", "K", "variant", "ms/update", "/adam", "/naive", "/naive (minima)",
                              "extra temp / params"], table))

  leaves_rows = []
  for name, (count, shape) in LEAVES.items():
    for r in measure(_kernels(count, shape), LEAVES_COMPONENTS, ("adam", "prior"), rounds * 3, budget / 2):
      leaves_rows.append({"case": name, **r})
  ratios = {}
  for key in ("overhead_ms", "overhead_min_ms"):
    over = {r["case"]: r[key] for r in leaves_rows if r["variant"] == "prior"}
    many, one = over["100 x 64x64"], over["1 x 640x640"]
    ratios[key] = many / one if one > 0 else None
  ratio, ratio_min = ratios["overhead_ms"], ratios["overhead_min_ms"]
  print()
  print(common.format_table(
      ["leaves", "variant", "ms/update", "prior - adam (ms)"],
      [[r["case"], r["variant"], common.fmt_ms(r["median_ms"] / 1e3),
        common.fmt_ms(r["overhead_ms"] / 1e3)] for r in leaves_rows]))
  print(f"prior overhead, 100 leaves / 1 leaf: {common.fmt_ratio(ratio)} (medians), "
        f"{common.fmt_ratio(ratio_min)} (minima)")
  recorder.stop()
  if args.quick:
    print("\n--quick: no JSON written")
    return 0
  path = recorder.write(args.out, {
      "settings": {"sizes": list(sizes), "components": list(components), "strength": STRENGTH,
                   "rounds": rounds, "leaves": {k: [c, list(s)] for k, (c, s) in LEAVES.items()},
                   "leaves_components": LEAVES_COMPONENTS,
                   "memory": "XLA memory_analysis().temp_size_in_bytes of the compiled update "
                             "(extra_peak_bytes; extra_over_adam_bytes subtracts Adam's)",
                   "timing": "variants of one configuration timed in turn, round after round, in one process"},
      "rows": rows,
      "leaves_rows": leaves_rows,
      "leaves_overhead_ratio": ratio,
      "leaves_overhead_ratio_min": ratio_min,
  }, name=f"prior_overhead_{backend}")
  print(f"\nwrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
