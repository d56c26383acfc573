"""Shift detection: Nowlan & Hinton (1992), soft weight-sharing against its rivals, on the paper's protocol.

    python -m benchmarks.shift_detection [--quick] [--out DIR] [--no-progress]

Nowlan & Hinton, "Adaptive soft weight tying using Gaussian mixtures" (NIPS 4,
1992; the same Table 1 as the Neural Computation paper): a 20-10-1 network
with 101 weights learns from 100 patterns whether the second block of 10 bits
is the first shifted left (target +1) or right (−1). The paper's protocol:
2400 independent draws (100 train / 1000 validation / 1300 test, so the splits
overlap), ten runs per method from the same ten initial weight sets, the cost
of their eq. 4 (squared error under a Gaussian noise model whose σ_y is
learned, plus −Σ log p(w) for soft-share), every parameter, the mixture
included, updated at once by a full-batch line-search optimizer (here
``optax.lbfgs``, the paper's was conjugate gradient) for a fixed budget. The
methods: plain (run to the end), cross-validation (the iterate with the best
validation error), weight elimination (λ chosen on validation), soft-share 5
and 10 (``ss.mixture_penalty``, strength 1 as in eq. 4). The network details
the paper does not state are ``VARIANTS``; each is run in full. Quick mode (the
tests): 2 seeds, the base variant, 150 iterations. Writes
``<out>/shift_detection.json`` and ``.png`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import datasets
from benchmarks import generalization as gen

# ----------------------------------------------------------------------------
# Protocol.

BITS = 10                     # pattern length; 2 × BITS inputs
HIDDEN = 10
WINDOW = 4                    # adjacent positions of each block a hidden unit sees
SPLITS = {"train": 100, "valid": 1000, "test": 1300}
DATA_SEED = 0
SEEDS = 10
NUM_PARAMS = HIDDEN * (2 * WINDOW + 1) + HIDDEN + 1  # 101
ITERATIONS = 500              # L-BFGS iterations, every method
WE_GRID = (0.01, 0.1, 1.0)    # weight elimination λ (summed cost units), chosen on validation
WE_W0 = 1.0
SOFT_STRENGTH = 1.0           # eq. 4: the prior's cost is added with weight 1 to the noise model's
# The choices the paper does not state: the base, then one change at a time.
BASE = dict(coding="pm1", activation="tanh", init_scale=0.5)
VARIANTS = {
    "base": {},
    "0/1 inputs": dict(coding="01"),
    "logistic hidden": dict(activation="logistic"),
    "init 0.1": dict(init_scale=0.1),
}
LIVE = 0.01                   # a mixture component counts as alive when its proportion π exceeds this
PAPER = {"plain": (67.3, 5.7), "cross-validation": (83.5, 5.1), "weight elimination": (89.8, 3.0),
         "soft-share 5": (95.6, 2.7), "soft-share 10": (97.1, 2.1)}
QUICK = dict(seeds=2, iterations=30, variants=("base",))
FINDINGS = ("Full run (10 seeds, 500 L-BFGS iterations): the paper's ordering is not reproduced in any variant. Plain "
            "87.6-89.4 %, cross-validation 92.9-95.0 %, weight elimination 89.6-90.6 %; soft-share under eq. 4 with "
            "sigma_y and the mixture learned jointly ends at 49-77 %: the joint cost is lower (e.g. -446 against "
            "-249 nats) at a degenerate optimum where sigma_y -> ~1 explains the targets as noise and the weights "
            "shrink into tight clusters, so L-BFGS, which finds lower costs, finds it. With the noise fixed and "
            "the strength chosen on validation (benchmarks/generalization.py: a zero component, 8 free ones, a "
            "fixed-scale precision prior) soft-share scores 95.7 %, above weight elimination (92.2 %), just below "
            "weight decay (96.1 %). See docs/benchmarks.md.")


# ----------------------------------------------------------------------------
# Data.


def make_data(seed: int = DATA_SEED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Training, validation and test patterns (``SPLITS``), independent draws from ``default_rng(seed)``."""
  return datasets.shift_data(SPLITS, seed, BITS)


def connectivity() -> np.ndarray:
  """(HIDDEN, 2 WINDOW) input indices: unit j sees positions j..j+3 (mod 10) of both blocks."""
  first = (np.arange(HIDDEN)[:, None] + np.arange(WINDOW)[None, :]) % BITS
  return np.concatenate([first, first + BITS], axis=1)


IDX = connectivity()


# ----------------------------------------------------------------------------
# Model.


def init_params(seed: int, init_scale: float = BASE["init_scale"]) -> dict[str, jax.Array]:
  """hidden: (10, 9) = 8 weights + bias per unit; out: (11,) = 10 weights + bias; U(−scale, scale)."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  u = lambda k, s: jax.random.uniform(k, s, jnp.float32, -init_scale, init_scale)  # noqa: E731
  return {"hidden": u(k1, (HIDDEN, 2 * WINDOW + 1)), "out": u(k2, (HIDDEN + 1,))}


def make_apply(activation: str = BASE["activation"]):
  """The network's output: hidden units over their 8 connected inputs, a linear output unit."""
  act = jnp.tanh if activation == "tanh" else jax.nn.sigmoid

  def apply(params: dict, x: jax.Array) -> jax.Array:
    xs = x[:, IDX]                                       # (n, 10, 8)
    w = params["hidden"]
    h = act(jnp.einsum("nhk,hk->nh", xs, w[:, :-1]) + w[:, -1])
    return h @ params["out"][:-1] + params["out"][-1]

  return apply


logits = make_apply()


def sign_error(pred: jax.Array, y: jax.Array) -> jax.Array:
  """Fraction misclassified: the output's sign against the ±1 target."""
  return jnp.mean(jnp.where(pred > 0, 1.0, -1.0) != y)


def problem(coding: str = BASE["coding"], activation: str = BASE["activation"],
            init_scale: float = BASE["init_scale"]) -> gen.Problem:
  """The paper's data (targets ±1) and network as a :class:`benchmarks.generalization.Problem`."""
  data = {}
  for split, (x, y) in make_data().items():
    data[split] = ((2.0 * x - 1.0) if coding == "pm1" else x, 2.0 * y - 1.0)
  return gen.Problem("shift detection", data, lambda seed: init_params(seed, init_scale), make_apply(activation),
                     sign_error, "test % misclassified")


# ----------------------------------------------------------------------------
# Methods and training.


def run_variant(variant: dict, cfg: dict, progress: bool = True) -> dict[str, list[dict]]:
  """Every method on one variant, from the same seeds: per method, one record per seed (and per λ for WE)."""
  p = problem(**{**BASE, **variant})
  seeds = np.arange(cfg["seeds"])
  specs = {"plain": ("plain", (0.0,), 0, False), "cross-validation": ("plain", (0.0,), 0, True),
           "weight elimination": ("weight elimination", WE_GRID, 0, False),
           "soft-share 5": ("soft-share", (SOFT_STRENGTH,), 5, False),
           "soft-share 10": ("soft-share", (SOFT_STRENGTH,), 10, False)}
  out = {}
  for name, (method, cs, k, early) in common.progress_bar(list(specs.items()), "shift", enabled=progress,
                                                            leave=False):
    cs = np.asarray(cs, np.float64)
    res = gen.train(p, method, cs, seeds, cfg["iterations"], components=k, learned_noise=True,
                    early_stopping=early)
    out[name] = gen.evaluate(p, method, cs, seeds, res)
  return out


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
  """Per method (λ chosen on validation for weight elimination): accuracies, mean ± std over seeds."""
  out = {}
  for name, records in runs.items():
    sel = gen.select(records)
    rs = [r for r in records if r["c"] == sel["chosen_c"]]
    out[name] = {
        "test_pct": common.mean_std([100 * (1 - r["test_error"]) for r in rs]),
        "valid_pct": common.mean_std([100 * (1 - r["valid_error"]) for r in rs]),
        "train_pct": common.mean_std([100 * (1 - r["train_error"]) for r in rs]),
        "runs_100pct_train": sum(r["train_error"] == 0.0 for r in rs),
        "chosen_c": sel["chosen_c"],
        "noise_stddev": common.mean_std([r["noise_stddev"] for r in rs]),
        "paper_test_pct": {"mean": PAPER[name][0], "std": PAPER[name][1]},
    }
    if "live_components" in rs[0]:
      out[name]["live_components"] = common.mean_std([float(r["live_components"]) for r in rs])
      out[name]["collapsed_components"] = common.mean_std([float(r["collapsed_components"]) for r in rs])
  return out


def table(summary: dict[str, dict]) -> str:
  """The results table, one row per method, with the paper's test accuracy."""
  fmt = common.fmt_mean_std
  rows = [(name, fmt(s["test_pct"]), fmt(s["paper_test_pct"]), fmt(s["valid_pct"]), f"{s['train_pct']['mean']:.1f}",
           f"{s['runs_100pct_train']}/{s['test_pct']['n']}", f"{s['noise_stddev']['mean']:.3g}",
           f"{s['live_components']['mean']:.1f}" if "live_components" in s else "-")
          for name, s in summary.items()]
  return common.format_table(
      ("method", "test %", "paper test %", "valid %", "train %", "100% train", "sigma_y", "live comp."), rows,
      align="<>>>>>>>")


def ordering_met(summary: dict[str, dict]) -> bool:
  """The paper's order plain < cross-validation < weight elimination < soft-share (both K)."""
  m = {name: summary[name]["test_pct"]["mean"] for name in PAPER}
  soft = min(m["soft-share 5"], m["soft-share 10"])
  return m["plain"] < m["cross-validation"] < m["weight elimination"] < soft


def plot(summaries: dict[str, dict], runs: dict[str, list[dict]], path: str) -> str:
  """Test accuracy per variant against the paper's, and the base variant's seed-0 soft-share 10 mixture."""
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
  ax = axes[0]
  names = list(PAPER)
  groups = ["paper", *summaries]
  width = 0.8 / len(groups)
  x = np.arange(len(names))
  for g, group in enumerate(groups):
    if group == "paper":
      vals = [PAPER[n] for n in names]
    else:
      vals = [(summaries[group][n]["test_pct"]["mean"], summaries[group][n]["test_pct"]["std"]) for n in names]
    ax.bar(x + (g - (len(groups) - 1) / 2) * width, [v[0] for v in vals], width, yerr=[v[1] for v in vals],
           capsize=2, label=group, color="0.7" if group == "paper" else None)
  ax.set_xticks(x, [n.replace(" ", "\n", 1) for n in names], fontsize=8)
  ax.set_ylim(40, 100)
  ax.set_ylabel("test % correct (mean ± std over seeds)")
  ax.set_title("shift detection on the paper's protocol")
  ax.legend(fontsize=7, ncol=2, loc="lower right")
  ax.grid(axis="y", alpha=0.3)
  ax = axes[1]
  r = runs["soft-share 10"][0]
  w = np.asarray(r["weights"])
  m = r["mixture"]
  lim = max(np.abs(w).max(), 1e-3) * 1.1
  ax.hist(w, bins=60, range=(-lim, lim), color="tab:blue", alpha=0.6, label=f"{len(w)} weights")
  grid = np.linspace(-lim, lim, 1000)
  dens = sum(pi * np.exp(-0.5 * ((grid - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
             for mu, sd, pi in zip(m["means"], m["stddevs"], m["weights"]))
  ax.plot(grid, dens * len(w) * 2 * lim / 60, color="tab:red", lw=1.2, label="learned mixture (scaled)")
  ax.set_ylim(0, max(np.histogram(w, bins=60, range=(-lim, lim))[0].max() * 1.5, 1))
  ax.set_title(f"soft-share 10, base, seed {r['seed']}: test {100 * (1 - r['test_error']):.1f}%, "
               f"{r['live_components']} live", fontsize=9)
  ax.set_xlabel("weight value")
  ax.legend(fontsize=7)
  fig.tight_layout()
  return common.save_figure(fig, path)


def default_cfg(quick: bool = False) -> dict:
  """The settings of a run (the module constants; ``QUICK`` overrides for ``--quick``)."""
  cfg = dict(seeds=SEEDS, iterations=ITERATIONS, variants=tuple(VARIANTS))
  if quick:
    cfg.update(QUICK)
  return cfg


def main(argv=None) -> int:
  """Runs every method on every variant, prints the tables, writes the JSON and the figure."""
  parser = common.argument_parser("shift_detection", __doc__,
                                   f"{QUICK['seeds']} seeds, {QUICK['iterations']} iterations, the base variant")
  args = parser.parse_args(argv)
  cfg = default_cfg(args.quick)
  recorder = common.Recorder("shift_detection", ("tqdm", "matplotlib"))
  runs = {v: run_variant(VARIANTS[v], cfg, not args.no_progress) for v in cfg["variants"]}
  elapsed = recorder.stop()
  summaries = {v: summarize(r) for v, r in runs.items()}
  goals = {}
  for v, summary in summaries.items():
    soft_min = min(summary[n]["test_pct"]["mean"] for n in summary if n.startswith("soft-share"))
    goals[v] = {"ordering_as_paper": ordering_met(summary), "soft_share_at_least_95": soft_min >= 95.0}
    goals[v]["met"] = goals[v]["ordering_as_paper"] and goals[v]["soft_share_at_least_95"]
    print(f"\n{v} ({ {**BASE, **VARIANTS[v]} }):")
    print(table(summary))
    print(f"goal: {'met' if goals[v]['met'] else 'NOT met'} ({goals[v]})")
  goal = dict(goals["base"], per_variant=goals)
  print(f"\n{cfg['seeds']} seeds, {NUM_PARAMS} weights, L-BFGS {cfg['iterations']} iterations, {elapsed:.0f} s")
  path = recorder.write(args.out, {
      "reference": "Nowlan & Hinton (1992), Adaptive soft weight tying using Gaussian mixtures (NIPS 4), "
                   "Table 1; Simplifying neural networks by soft weight-sharing, Neural Computation 4(4)",
      "settings": {
          "mode": "quick" if args.quick else "full", **cfg, "variants": {v: {**BASE, **VARIANTS[v]}
                                                                           for v in cfg["variants"]},
          "splits": SPLITS, "data_seed": DATA_SEED, "we_grid": list(WE_GRID), "we_w0": WE_W0,
          "soft_strength": SOFT_STRENGTH, "log_noise_floor": gen.LOG_NOISE_FLOOR,
          "data": "pattern ~ 10 fair bits; direction ~ fair bit; x = [pattern, pattern circularly shifted one "
                  "bit in that direction]; target +1 left, -1 right; 2400 independent draws (numpy "
                  "default_rng(data_seed)) split 100/1000/1300, so patterns repeat across splits",
          "model": f"20-10-1, {NUM_PARAMS} parameters: hidden (10, 9) = 8 weights + bias per unit (unit j sees "
                   "positions j..j+3 mod 10 of both blocks: a reconstruction), out (11,) = 10 weights + bias, "
                   "linear output; activation, input coding and init U(-s, s) per variant",
          "connectivity": IDX.tolist(),
          "cost": "N log sigma_y + sum (y - d)^2 / (2 sigma_y^2) + c R(w), sigma_y = exp(log_noise) learned "
                  "(floored at exp(log_noise_floor)); R = 0 (plain, cross-validation), weight elimination "
                  "sum (w/w0)^2/(1+(w/w0)^2) with c = lambda chosen on validation from we_grid, "
                  "ss.mixture_penalty(params, mixture, mask=all, precision_prior='auto') with c = 1 (eq. 4)",
          "optimizer": f"optax.lbfgs(memory_size={gen.MEMORY}) on all parameters at once (weights, log sigma_y, "
                       f"the mixture's means, log-precisions and logits), full batch, {cfg['iterations']} "
                       "iterations; cross-validation keeps the iterate with the lowest validation error",
          "mixture_init": f"means evenly over +-{gen.MIXTURE_SPREAD:g}, every sigma {gen.MIXTURE_STDDEV:g}, equal "
                          "proportions (the default range init on the small initial weights collapsed every run)",
          "seed_use": "seed s: the initial weights (jax.random.key(s)), the same for every method; one data set",
      },
      "goal": goal, "findings": FINDINGS, "summary": summaries["base"], "summaries": summaries,
      "runs": runs["base"],
  })
  png = plot(summaries, runs["base"], os.path.join(args.out, "shift_detection.png"))
  print(f"\nwrote {path} and {png} ({elapsed:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
