"""How strong should the weight-sharing prox be? Strength, distinct values per group and accuracy.

    python -m benchmarks.prox_strength [--quick] [--out DIR] [--no-progress]

Trains the digits MLP (``digits.DigitsTask``: 64-64-10, scikit-learn's 8x8
digits, 1347 training images, batch 64, 21 steps per epoch) with SGD (lr
0.05, momentum 0.9, as ``benchmarks/demo.py``) followed LAST by
``ss.weight_sharing_prox(λ, 0.05, axis=a, mask=kernels)``, for every λ in
``STRENGTHS`` and ``a`` in ``AXES``, from the same initialization and data
order per seed (λ = 0 is plain SGD). After each of ``CHECKPOINTS`` epochs it
records, per kernel, the distinct values per group (median, min and max over
the groups: the output neurons for ``axis=0``, the whole kernel for
``axis=None``), the share of groups collapsed to a single value, and the test
accuracy.

The guide's unit: each prox step moves a weight by at most t = λ·lr, so after
s steps the prox has pulled by at most T = t·s. The table gives T / σ, σ the
standard deviation of the initial kernel weights (1/√64 ≈ 0.125 here, Flax's
LeCun normal); without the loss, a group whose weights are spread like σ
starts merging at its densest part once T reaches about σ and is one value
once T passes half its range (see the weight_sharing_prox docstring). With
the loss's gradient pushing back at every step the numbers below are what
actually happens. Writes ``<out>/prox_strength.json`` (default
``benchmarks/results``).
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np

import softshare_jax as ss

from benchmarks import common
from benchmarks import digits
from benchmarks import training

LEARNING_RATE = 0.05
MOMENTUM = 0.9
STRENGTHS = (0.0, 0.003, 0.01, 0.02, 0.05, 0.1, 0.3)
AXES = (0, None)
CHECKPOINTS = (10, 20, 40)  # epochs
SEEDS = (0, 1)
QUICK = dict(strengths=(0.0, 0.05), axes=(0, None), checkpoints=(1, 2), seeds=(0,))


def groups_of(w: np.ndarray, axis: Any) -> list[np.ndarray]:
  """The prox's groups of a 2-D kernel: its columns (axis=0, one per output neuron) or all of it."""
  return [w[:, j] for j in range(w.shape[1])] if axis == 0 else [w.ravel()]


def layer_stats(params: Any, axis: Any) -> dict:
  """Per kernel: group size d, and distinct values per group (median, min, max), share collapsed."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if getattr(path[-1], "key", None) != "kernel":
      continue
    counts = [int(np.unique(g).size) for g in groups_of(np.asarray(leaf), axis)]
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    out[name] = {"groups": len(counts), "d": int(np.asarray(leaf).size // len(counts)),
                 "distinct_median": float(np.median(counts)), "distinct_min": min(counts),
                 "distinct_max": max(counts), "collapsed_share": float(np.mean([c == 1 for c in counts]))}
  return out


def run(task: digits.DigitsTask, strength: float, axis: Any, seed: int, checkpoints: tuple[int, ...],
        sigma: float, count_axes: tuple) -> list[dict]:
  """One training run; a record per checkpoint and per axis in ``count_axes`` (how its groups are counted)."""
  tx = training.sgd_prox(LEARNING_RATE, MOMENTUM, strength or None, axis=axis, mask=training.kernel_mask)
  loss = training.cross_entropy(task.apply)
  epoch_fn = training.make_epoch(loss, tx)
  params = task.init(seed)
  state = tx.init(params)
  order = np.random.default_rng(seed + 1)  # Advances across the segments: one data order per seed.
  steps_per_epoch = len(task.data.y_train) // task.batch
  t = strength * LEARNING_RATE
  records, done = [], 0
  for epochs in checkpoints:
    trained = training.train(loss, tx, params, task.data.x_train, task.data.y_train, epochs - done,
                           batch=task.batch, shuffle=order, state=state, epoch_fn=epoch_fn)
    params, state, done = trained.params, trained.state, epochs
    shared = {"seed": seed, "strength": strength, "epochs": epochs, "t": t, "steps": epochs * steps_per_epoch,
              "sigma": sigma, "T_over_sigma": t * epochs * steps_per_epoch / sigma,
              "test_accuracy": task.accuracy(params), "train_accuracy": task.accuracy(params, "train"),
              "kernel_distinct": ss.sharing_stats(params, mask=training.kernel_mask).total.distinct}
    records += [dict(shared, axis=a, layers=layer_stats(params, a)) for a in count_axes]
  return records


def summarize(records: list[dict]) -> list[dict]:
  """Mean over seeds of every (axis, strength, epochs): accuracy and each layer's distinct values."""
  keys = sorted({(str(r["axis"]), r["strength"], r["epochs"]) for r in records}, key=lambda k: (k[0], k[1], k[2]))
  rows = []
  for axis, strength, epochs in keys:
    group = [r for r in records if (str(r["axis"]), r["strength"], r["epochs"]) == (axis, strength, epochs)]
    layers = {name: {f: float(np.mean([r["layers"][name][f] for r in group]))
                     for f in ("distinct_median", "distinct_min", "distinct_max", "collapsed_share")}
              for name in group[0]["layers"]}
    for name in layers:
      layers[name]["d"] = group[0]["layers"][name]["d"]
    rows.append({"axis": axis, "strength": strength, "epochs": epochs, "t": group[0]["t"],
                 "T_over_sigma": group[0]["T_over_sigma"],
                 "test_accuracy": common.mean_std([r["test_accuracy"] for r in group]),
                 "kernel_distinct": common.mean_std([r["kernel_distinct"] for r in group]), "layers": layers})
  return rows


def table(rows: list[dict]) -> str:
  """One line per (axis, strength, epochs)."""
  out = []
  for r in rows:
    layers = [f"{v['distinct_median']:.0f} [{v['distinct_min']:.0f}-{v['distinct_max']:.0f}]"
              for v in r["layers"].values()]
    collapsed = np.mean([v["collapsed_share"] for v in r["layers"].values()])
    out.append((r["axis"], f"{r['strength']:g}", f"{r['t']:.2g}", r["epochs"], f"{r['T_over_sigma']:.2f}",
                common.fmt_mean_std(r["test_accuracy"], digits=1, scale=100.0, single=True), *layers,
                f"{100 * collapsed:.0f}"))
  names = list(rows[0]["layers"]) if rows else []
  headers = ("axis", "λ", "t=λ·lr", "epochs", "T/σ", "test acc %",
             *[f"{n} distinct/group" for n in names], "collapsed %")
  return common.format_table(headers, out, align="<>>>>>" + ">" * len(names) + ">")


def main(argv: list[str] | None = None) -> int:
  """Runs every (seed, axis, strength), prints the table, writes the JSON."""
  parser = common.argument_parser("prox_strength", __doc__, "2 strengths, 2 epochs, one seed")
  args = parser.parse_args(argv)
  cfg = QUICK if args.quick else dict(strengths=STRENGTHS, axes=AXES, checkpoints=CHECKPOINTS, seeds=SEEDS)
  recorder = common.Recorder("prox_strength", ("scikit-learn",))
  task = digits.DigitsTask.load(0)
  records = []
  # Plain SGD (λ = 0) is trained once per seed; its groups are counted under every axis.
  runs = [(seed, axis, lam) for seed in cfg["seeds"] for axis in cfg["axes"] for lam in cfg["strengths"]
          if lam > 0 or axis == cfg["axes"][0]]
  with common.progress_bar(runs, "prox_strength", enabled=not args.no_progress) as bar:
    for seed, axis, lam in bar:
      sigma = float(np.std(training.kernel_values(task.init(seed))))
      records += run(task, lam, axis, seed, tuple(cfg["checkpoints"]), sigma,
                     tuple(cfg["axes"]) if lam == 0 else (axis,))
  rows = summarize(records)
  elapsed = recorder.stop()
  print(f"prox_strength: {'quick' if args.quick else 'full'} mode, digits MLP, SGD lr {LEARNING_RATE} "
        f"momentum {MOMENTUM}, seeds {list(cfg['seeds'])}, backend {jax.default_backend()}, {elapsed:.0f} s")
  print(table(rows))
  print("distinct/group: median [min-max] over the groups (axis=0: the 64 output neurons of a kernel, "
        "d = 64 inputs each; axis=None: the whole kernel); collapsed: groups with one value, mean over "
        "the kernels; T/σ: the prox's accumulated pull λ·lr·steps over the initial weights' std.")
  path = recorder.write(args.out, {
      "settings": {"mode": "quick" if args.quick else "full",
                   "task": "the DigitsTask of benchmarks/digits.py (seed 0 split)",
                   "optimizer": f"optax.sgd({LEARNING_RATE}, momentum={MOMENTUM}) then "
                                f"ss.weight_sharing_prox(strength, {LEARNING_RATE}, axis=axis, mask=kernels)",
                   **{k: list(v) for k, v in cfg.items()}},
      "results": rows, "runs": records})
  print(f"\nwrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
