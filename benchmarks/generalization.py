"""Small-data generalization: soft weight sharing against plain training, weight decay and weight elimination.

    python -m benchmarks.generalization [--quick] [--out DIR] [--no-progress]

Nowlan & Hinton's claim (1992) is that a learned mixture prior generalizes
better than the usual penalties on a small network trained on little data.
Four problems, each with about 100 weights and 100-200 training examples:

* shift detection (their sec. 5; the network and data of
  ``benchmarks/shift_detection.py``), test error = % misclassified;
* ``sklearn.datasets.load_diabetes`` (442 patients, 10 inputs), test error =
  mean squared error over the (training) target variance;
* Mackey-Glass (τ = 17, generated), x(t + 6) from x(t), x(t − 6), x(t − 12),
  x(t − 18) with 5 % observation noise, the same normalized error;
* Friedman #1 (``sklearn.datasets.make_friedman1``, 10 inputs of which 5 are
  noise), the same normalized error.

Every method minimizes, by full-batch L-BFGS (``optax.lbfgs``, a fixed
number of iterations), mean squared error + (c / N) · R(w) over all the
network's parameters (biases included), with R: 0 (plain), ½ Σ w² (weight
decay), Σ (w/w0)² / (1 + (w/w0)²), w0 = 1 (weight elimination), or
``ss.mixture_penalty`` of a mixture learned jointly with the weights
(soft-share K; ``precision_prior="auto"``, no zero component, the mixture's
means, log-precisions and logits in the optimized pytree). c is chosen per
method from ``GRIDS`` by the mean validation error over the seeds; the test
error is read only at the chosen c. 10 seeds (initial weights); the data split
is fixed. Writes ``<out>/generalization.json`` and ``.png``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import softshare_jax as ss

from benchmarks import common
from benchmarks import datasets

SEEDS = 10
ITERATIONS = 500              # L-BFGS iterations (each with its zoom line search)
MIXTURE_STDDEV = 1.0          # soft-share's starting mixture: every σ_j
MIXTURE_SPREAD = 1.0          # and the means evenly over [-spread, spread]
MEMORY = 10                   # L-BFGS history
LOG_NOISE_FLOOR = -5.0        # learned noise: σ_y >= exp(-5) (else the likelihood of a perfect fit is unbounded)
INIT_SCALE = 0.5              # initial weights ~ U(-0.5, 0.5) (fan-in scaled nets are not the point here)
HIDDEN = 8
COMPONENTS = (4, 8)
GRIDS = {
    "plain": (0.0,),
    "weight decay": (0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
    "weight elimination": (0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
    "soft-share": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
}
WE_W0 = 1.0
LIVE = 0.01                   # a component is alive when its proportion exceeds this
QUICK = dict(seeds=2, iterations=20, grid_every=3, problems=("diabetes",))


# ----------------------------------------------------------------------------
# Problems.


@dataclasses.dataclass(frozen=True)
class Problem:
  """A data set with its network: ``apply(params, x)`` predicts y; ``error(pred, y)`` is the test metric."""

  name: str
  data: dict            # split -> (x, y), float32
  init: Callable        # seed -> params (dict of arrays)
  apply: Callable       # (params, x) -> predictions (n,)
  error: Callable       # (pred, y) -> scalar error (lower is better)
  metric: str


def mlp_init(inputs: int, hidden: int = HIDDEN, scale: float = INIT_SCALE) -> Callable:
  """Initial weights of an ``inputs``-``hidden``-1 tanh network, the bias as the last row of each layer."""
  def init(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    u = lambda k, s: jax.random.uniform(k, s, jnp.float32, -scale, scale)  # noqa: E731
    return {"hidden": u(k1, (inputs + 1, hidden)), "out": u(k2, (hidden + 1,))}
  return init


def mlp_apply(params: dict, x: jax.Array) -> jax.Array:
  """tanh hidden units, linear output."""
  w = params["hidden"]
  h = jnp.tanh(x @ w[:-1] + w[-1])
  return h @ params["out"][:-1] + params["out"][-1]


def normalized_mse(pred: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error in units of the training target's variance (the targets are standardized)."""
  return jnp.mean(jnp.square(pred - y))


def _regression(name: str, x: np.ndarray, y: np.ndarray, sizes: dict) -> Problem:
  data = datasets.regression_splits(x, y, sizes, seed=0)
  return Problem(name, data, mlp_init(x.shape[1]), mlp_apply, normalized_mse, "test MSE / var(y)")


def problems() -> dict[str, Problem]:
  """The four problems; data are fixed (seed 0), only the initial weights vary with the seed."""
  from sklearn.datasets import load_diabetes
  from sklearn.datasets import make_friedman1

  from benchmarks import shift_detection as sd

  out = {"shift detection": sd.problem()}
  xd, yd = load_diabetes(return_X_y=True)
  out["diabetes"] = _regression("diabetes", xd, yd, {"train": 150, "valid": 146, "test": 146})
  series = datasets.mackey_glass(1500)
  series = series + 0.05 * series.std() * np.random.default_rng(1).normal(size=series.shape)
  xm, ym = datasets.lagged(series, (0, 6, 12, 18), 6)
  out["mackey-glass"] = _regression("mackey-glass", xm, ym, {"train": 150, "valid": 500, "test": 800})
  xf, yf = make_friedman1(n_samples=1600, n_features=10, noise=1.0, random_state=0)
  out["friedman1"] = _regression("friedman1", xf, yf, {"train": 100, "valid": 500, "test": 1000})
  return out


# ----------------------------------------------------------------------------
# Objectives and training.


def weight_vector(params: Any) -> jax.Array:
  return jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(params)])


def penalty_fn(method: str) -> Callable:
  """R(theta) of a method, in summed (per-data-set) units."""
  if method == "plain":
    return lambda theta: jnp.zeros(())
  if method == "weight decay":
    return lambda theta: 0.5 * jnp.sum(jnp.square(weight_vector(theta["net"])))
  if method == "weight elimination":
    def we(theta):
      r = jnp.square(weight_vector(theta["net"]) / WE_W0)
      return jnp.sum(r / (1.0 + r))
    return we
  all_leaves = lambda p: jax.tree.map(lambda _: True, p)  # noqa: E731
  return lambda theta: ss.mixture_penalty(theta["net"], theta["mixture"], mask=all_leaves,
                                          precision_prior="auto", zero_precision_prior="auto")


def initial_theta(problem: Problem, method: str, components: int, seed: int, learned_noise: bool) -> dict:
  """The optimized pytree: the network, the mixture (soft-share) and log σ_y (learned noise)."""
  net = problem.init(seed)
  theta = {"net": net}
  if method == "soft-share":
    # Broad components (σ = MIXTURE_STDDEV, means evenly over ±MIXTURE_SPREAD): tight ones started on the
    # small initial weights pull every weight to a few values before the data has shaped them (measured on
    # shift detection: the default range init collapsed all weights, 50 % test).
    m = ss.init_mixture(weight_vector(net), components, zero_component=False)
    theta["mixture"] = dataclasses.replace(
        m, free_means=jnp.linspace(-MIXTURE_SPREAD, MIXTURE_SPREAD, components, dtype=jnp.float32),
        log_precisions=jnp.full((components,), -2.0 * np.log(MIXTURE_STDDEV), jnp.float32))
  if learned_noise:
    theta["log_noise"] = jnp.zeros((), jnp.float32)
  return theta


def objective(problem: Problem, method: str, learned_noise: bool) -> Callable:
  """(theta, c) -> cost on the training split.

  Fixed noise: mean squared error + (c / N) R. Learned noise (Nowlan & Hinton's
  eq. 4): the Gaussian negative log-likelihood N log σ_y + Σ (y − d)² / (2 σ_y²)
  + c R, with log σ_y a leaf of theta (floored at ``LOG_NOISE_FLOOR``).
  """
  x, y = map(jnp.asarray, problem.data["train"])
  n = x.shape[0]
  pen = penalty_fn(method)

  def cost(theta, c):
    sq = jnp.sum(jnp.square(problem.apply(theta["net"], x) - y))
    if learned_noise:
      s = jnp.maximum(theta["log_noise"], LOG_NOISE_FLOOR)
      return n * s + 0.5 * sq * jnp.exp(-2.0 * s) + c * pen(theta)
    return sq / n + c / n * pen(theta)

  return cost


def train(problem: Problem, method: str, cs: np.ndarray, seeds: np.ndarray, iterations: int,
          components: int = 0, learned_noise: bool = False, early_stopping: bool = False) -> dict:
  """L-BFGS on every (c, seed) pair at once (vmapped): final theta per pair, stacked.

  With ``early_stopping`` the iterate with the lowest validation error is
  returned instead of the last (the "cross-validation" method: the
  validation set decides when learning ends).
  """
  cost = objective(problem, method, learned_noise)
  xv, yv = map(jnp.asarray, problem.data["valid"])
  thetas = [initial_theta(problem, method, components, int(s), learned_noise) for s in seeds]
  theta0 = jax.tree.map(lambda *v: jnp.stack(v), *thetas)
  opt = optax.lbfgs(memory_size=MEMORY)

  @jax.jit
  @jax.vmap
  def run(c, theta):
    fun = lambda t: cost(t, c)  # noqa: E731
    vg = optax.value_and_grad_from_state(fun)

    def step(carry, _):
      t, state, best, best_err = carry
      value, grad = vg(t, state=state)
      updates, state = opt.update(grad, state, t, value=value, grad=grad, value_fn=fun)
      new = optax.apply_updates(t, updates)
      # A failed line search can hand back a non-finite step: keep the last finite iterate.
      ok = jnp.all(jnp.array([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(new)]))
      new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, t)
      if early_stopping:
        err = problem.error(problem.apply(new["net"], xv), yv)
        better = err < best_err
        best = jax.tree.map(lambda a, b: jnp.where(better, a, b), new, best)
        best_err = jnp.where(better, err, best_err)
      return (new, state, best, best_err), value

    init = (theta, opt.init(theta), theta, jnp.asarray(jnp.inf, jnp.float32))
    (t, _, best, _), values = jax.lax.scan(step, init, None, length=iterations)
    return (best if early_stopping else t), values[-1]

  cc = jnp.repeat(jnp.asarray(cs, jnp.float32), len(seeds))
  tt = jax.tree.map(lambda v: jnp.tile(v, (len(cs),) + (1,) * (v.ndim - 1)), theta0)
  final, last = run(cc, tt)
  return {"theta": jax.device_get(final), "cost": np.asarray(last)}


def collapsed_components(w: np.ndarray, m: ss.Mixture) -> int:
  """Components with σ < 1 % of std(w) that hold less than 1.5 weights (the degenerate maximum)."""
  mass = np.asarray(ss.responsibilities(m, jnp.asarray(w)).sum(axis=0))
  ratio = np.asarray(m.stddevs) / max(float(np.std(w)), 1e-12)
  return int(np.sum((ratio < 1e-2) & (mass < 1.5)))


def evaluate(problem: Problem, method: str, cs: np.ndarray, seeds: np.ndarray, out: dict) -> list[dict]:
  """One record per (c, seed): errors on every split, and the mixture's state for soft-share."""
  records = []
  for i, c in enumerate(np.repeat(cs, len(seeds))):
    theta = jax.tree.map(lambda v: v[i], out["theta"])
    rec = {"c": float(c), "seed": int(seeds[i % len(seeds)]), "final_cost": float(out["cost"][i])}
    for split, (x, y) in problem.data.items():
      rec[f"{split}_error"] = float(problem.error(problem.apply(theta["net"], jnp.asarray(x)), jnp.asarray(y)))
    if "log_noise" in theta:
      rec["noise_stddev"] = float(np.exp(max(float(theta["log_noise"]), LOG_NOISE_FLOOR)))
    if "mixture" in theta:
      w = np.asarray(weight_vector(theta["net"]))
      m = theta["mixture"]
      rec["mixture"] = common.mixture_dict(m)
      rec["live_components"] = int(np.sum(np.asarray(m.weights) > LIVE))
      rec["collapsed_components"] = collapsed_components(w, m)
      rec["weights"] = w.tolist()
    records.append(rec)
  return records


def select(records: list[dict]) -> dict:
  """The c with the lowest mean validation error over seeds, and the test errors there."""
  by_c: dict[float, list[dict]] = {}
  for r in records:
    by_c.setdefault(r["c"], []).append(r)
  valid = {c: float(np.nanmean([r["valid_error"] for r in rs])) for c, rs in by_c.items()}
  best = min(valid, key=lambda c: (np.inf if np.isnan(valid[c]) else valid[c]))
  rs = by_c[best]
  out = {"chosen_c": best, "valid_error_by_c": {str(c): v for c, v in valid.items()},
         "test_error": common.mean_std([r["test_error"] for r in rs]),
         "valid_error": common.mean_std([r["valid_error"] for r in rs]),
         "train_error": common.mean_std([r["train_error"] for r in rs])}
  if "collapsed_components" in rs[0]:
    out["collapsed_components"] = common.mean_std([float(r["collapsed_components"]) for r in rs])
    out["live_components"] = common.mean_std([float(r["live_components"]) for r in rs])
  return out


def method_list() -> list[tuple[str, str, int]]:
  """(label, method, K) for every method of the suite."""
  return ([(m, m, 0) for m in ("plain", "weight decay", "weight elimination")]
          + [(f"soft-share {k}", "soft-share", k) for k in COMPONENTS])


def run_problem(problem: Problem, cfg: dict, progress: bool = True) -> dict:
  """Every method on one problem: the per-(c, seed) records and the validation-chosen summary."""
  seeds = np.arange(cfg["seeds"])
  out = {}
  bar = common.progress_bar(method_list(), problem.name, enabled=progress, leave=False)
  for label, method, k in bar:
    cs = np.asarray(GRIDS[method][::cfg.get("grid_every", 1)], np.float64)
    res = train(problem, method, cs, seeds, cfg["iterations"], components=k)
    records = evaluate(problem, method, cs, seeds, res)
    out[label] = {"summary": select(records), "runs": records}
  return out


def default_cfg(quick: bool = False) -> dict:
  cfg = dict(seeds=SEEDS, iterations=ITERATIONS, grid_every=1,
             problems=("shift detection", "diabetes", "mackey-glass", "friedman1"))
  if quick:
    cfg.update(QUICK)
  return cfg


# ----------------------------------------------------------------------------
# Report.


def goal(results: dict) -> dict:
  """Per problem, whether the best soft-share's mean test error is no worse than the best baseline's."""
  per = {}
  for name, res in results.items():
    base = min(res[m]["summary"]["test_error"]["mean"] for m in ("plain", "weight decay", "weight elimination"))
    soft = min(res[m]["summary"]["test_error"]["mean"] for m in res if m.startswith("soft-share"))
    per[name] = {"best_baseline": base, "best_soft_share": soft, "soft_share_no_worse": bool(soft <= base)}
  wins = sum(p["soft_share_no_worse"] for p in per.values())
  return {"per_problem": per, "problems_won": wins, "met": wins >= 3 and len(per) == 4}


def table(results: dict) -> str:
  rows = []
  for name, res in results.items():
    for label, r in res.items():
      s = r["summary"]
      scale = 100.0 if name == "shift detection" else 1.0
      digits = 1 if name == "shift detection" else 3
      rows.append((name, label, common.fmt_mean_std(s["test_error"], digits, scale),
                   common.fmt_mean_std(s["valid_error"], digits, scale), f"{s['chosen_c']:g}",
                   f"{s['collapsed_components']['mean']:.1f}" if "collapsed_components" in s else "-"))
  return common.format_table(("problem", "method", "test error", "valid error", "chosen c", "collapsed"), rows,
                              align="<<>>>>")


def plot(results: dict, path: str) -> str:
  plt = common.pyplot()
  fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8))
  for ax, (name, res) in zip(np.atleast_1d(axes), results.items()):
    labels = list(res)
    scale = 100.0 if name == "shift detection" else 1.0
    means = [scale * res[m]["summary"]["test_error"]["mean"] for m in labels]
    stds = [scale * res[m]["summary"]["test_error"]["std"] for m in labels]
    colors = ["0.6", "C0", "C1", "C2", "C3"][:len(labels)]
    ax.bar(np.arange(len(labels)), means, yerr=stds, capsize=3, color=colors)
    for i, m in enumerate(labels):
      vals = [scale * v for v in res[m]["summary"]["test_error"]["values"]]
      ax.plot(np.full(len(vals), i), vals, ".", color="k", ms=3, alpha=0.6)
    ax.set_xticks(np.arange(len(labels)), [lab.replace(" ", "\n", 1) for lab in labels], fontsize=7)
    ax.set_title(name)
    ax.set_ylabel("test error, %" if name == "shift detection" else "test MSE / var(y)")
    ax.grid(axis="y", alpha=0.3)
  fig.suptitle("small-data generalization: mean ± std over seeds, c chosen on validation", fontsize=10)
  fig.tight_layout()
  return common.save_figure(fig, path)


def main(argv=None) -> int:
  parser = common.argument_parser("generalization", __doc__,
                                   f"{QUICK['seeds']} seeds, {QUICK['iterations']} iterations, a thinned grid")
  args = parser.parse_args(argv)
  cfg = default_cfg(args.quick)
  recorder = common.Recorder("generalization", ("scikit-learn", "matplotlib"))
  results = {name: run_problem(p, cfg, not args.no_progress) for name, p in problems().items()
             if name in cfg["problems"]}
  elapsed = recorder.stop()
  g = goal(results)
  print(f"small-data generalization: {cfg['seeds']} seeds, L-BFGS {cfg['iterations']} iterations, "
        f"{elapsed:.0f} s\n")
  print(table(results))
  print(f"\ngoal (soft-share no worse than the best baseline on >= 3 of 4): {'met' if g['met'] else 'NOT met'} "
        f"({g['problems_won']} of {len(results)})")
  path = recorder.write(args.out, {
      "reference": "Nowlan & Hinton (1992), Simplifying neural networks by soft weight-sharing",
      "settings": {"mode": "quick" if args.quick else "full", **cfg,
                   "grids": {k: [float(c) for c in v[::cfg["grid_every"]]] for k, v in GRIDS.items()},
                   "components": list(COMPONENTS), "hidden": HIDDEN, "init_scale": INIT_SCALE, "we_w0": WE_W0,
                   "optimizer": f"optax.lbfgs(memory_size={MEMORY}), full batch, {cfg['iterations']} iterations, "
                                "all parameters (mixture included) jointly",
                   "objective": "mean squared error + (c / N) R(w), R over all parameters (biases included); "
                                "soft-share: R = ss.mixture_penalty(params, mixture, precision_prior='auto', "
                                "zero_precision_prior='auto') with no zero component",
                   "selection": "per method, the c of the grid with the lowest mean validation error over seeds; "
                                "test error reported at that c only",
                   "mixture_init": f"means evenly over +-{MIXTURE_SPREAD:g}, every sigma {MIXTURE_STDDEV:g}, "
                                   "equal proportions",
                   "split_sizes": {n: {s: len(v[1]) for s, v in p.data.items()} for n, p in problems().items()}},
      "goal": g,
      "summary": {n: {m: r["summary"] for m, r in res.items()} for n, res in results.items()},
      "runs": {n: {m: r["runs"] for m, r in res.items()} for n, res in results.items()},
  })
  png = plot(results, os.path.join(args.out, "generalization.png"))
  print(f"\nwrote {path} and {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
