"""The compression recipe, measured: pretrain, retrain with the mixture prior, quantize, fine-tune.

    python -m benchmarks.recipe [--quick] [--out DIR] [--no-progress]

The recipe (the same text is in ``ss.mixture_prior``'s docstring, the README
and the notebooks), from a PRETRAINED model:

1. pretrain as usual (here Adam 1e-3);
2. retrain from the pretrained weights, about 2000 steps, with
   ``optax.chain(ss.mixture_prior(16, 0.012 / N, zero_weight=0.99,
   mixture_update="em", precision_prior=(250, 0.1),
   zero_precision_prior=(5000, 2)), optax.adam(1e-3))``, N the number of
   training examples and the loss a MEAN over the batch;
3. ``ss.merge_components(mixture, 1e-2)``, ``ss.quantize(params, merged)``;
4. fine-tune with ``ss.keep_clusters(q)`` and Adam 1e-3, about 200 steps;
5. ``ss.compression_report(q, params=retrained, mixture=merged)``.

Measured (``FULL_CASES``, ``SEEDS``): the digits MLP (``digits.DigitsTask``,
N = 1347) with c = strength × N in ``C_GRID``, with π_0 = 0.95 and 0.9, with
``compress_mnist``'s gradient mixture updates instead of EM, from an
SGD-pretrained model (``benchmarks/demo.py``'s optimizer), and from the
initialization (the recipe, and notebook 01's old setting
``mixture_prior(16, 3e-5)`` with Adam 3e-3); the c grid again with half the
training set (N = 673, steps matched: does the c that works move as 1/N?);
LeNet-300-100 on 4000 MNIST images (``compress_mnist``'s data and model; seed
0; full mode only). Each run records the test accuracy after pretraining,
retraining, quantizing and fine-tuning, the compression ratio, and
``compression_report``'s quality section (relative change per kernel, idle
components, warnings), from which its warning threshold was chosen. Writes
``<out>/recipe.json`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

import jax
import optax

import softshare_jax as ss

from benchmarks import common
from benchmarks import datasets
from benchmarks import digits
from benchmarks import training

COMPONENTS = 16
ZERO_WEIGHT = 0.99
PRECISION_PRIOR = (250.0, 0.1)        # Ullrich et al.'s tutorial: Gamma(250, 0.1) on the free precisions,
ZERO_PRECISION_PRIOR = (5000.0, 2.0)  # Gamma(5000, 2) on the zero component's
LEARNING_RATE = 1e-3
RETRAIN_STEPS = 2100
FINETUNE_STEPS = 210
MERGE_THRESHOLD = 1e-2
C_RECIPE = 0.012  # LeNet-300-100's measured strength (compress_mnist: 3e-6) times its N = 4000
C_GRID = (0.003, 0.012, 0.05)
SEEDS = (0, 1, 2)
PRETRAIN_STEPS = 1260  # 60 epochs of the digits
LENET_PRETRAIN_EPOCHS = 30
LENET_RETRAIN_EPOCHS = 50
OLD_NOTEBOOK = dict(strength=3e-5, learning_rate=3e-3, epochs=40)  # notebook 01's setting before the recipe
QUICK = dict(seeds=(0,), pretrain_steps=105, retrain_steps=42, finetune_steps=21, old_epochs=2, lenet=False)


def recipe(strength: float, zero_weight: float = ZERO_WEIGHT, gradient: bool = False) -> optax.GradientTransformation:
  """Step 2's optimizer: the mixture prior (EM, Ullrich's Gamma priors), then Adam.

  With ``gradient``, compress_mnist's variant instead of EM: the mixture moved
  by Adam on its gradient at its faster rates (``ss.mixture_adam(1e-3, 1e-2, 1e-2)``).
  """
  update = dict(mixture_optimizer=ss.mixture_adam(1e-3, 1e-2, 1e-2)) if gradient else dict(mixture_update="em")
  return optax.chain(
      ss.mixture_prior(COMPONENTS, strength, zero_weight=zero_weight, precision_prior=PRECISION_PRIOR,
                       zero_precision_prior=ZERO_PRECISION_PRIOR, **update),
      optax.adam(LEARNING_RATE))


def old_notebook_setting() -> optax.GradientTransformation:
  """Notebook 01's setting before the recipe: the then-default prior (gradient, flat priors) at 3e-5, Adam 3e-3."""
  return optax.chain(ss.mixture_prior(COMPONENTS, OLD_NOTEBOOK["strength"], precision_prior=None,
                                      zero_precision_prior=None),
                     optax.adam(OLD_NOTEBOOK["learning_rate"]))


@dataclasses.dataclass(frozen=True)
class Case:
  """One digits setting: where step 2 starts, c = strength × N, π_0, or notebook 01's old setting."""

  start: str  # "adam" or "sgd" (pretrained with that optimizer), or "init" (no pretraining)
  c: float = C_RECIPE
  zero_weight: float = ZERO_WEIGHT
  old: bool = False
  gradient: bool = False  # compress_mnist's gradient mixture updates instead of EM

  @property
  def setting(self) -> str:
    if self.old:
      return "old nb01"
    return ("gradient (compress_mnist)" if self.gradient else "recipe") + f", pi0={self.zero_weight:g}"


FULL_CASES = ([Case("adam", c) for c in C_GRID] + [Case("adam", zero_weight=0.95), Case("adam", zero_weight=0.9),
                                                   Case("adam", gradient=True), Case("sgd"), Case("init"),
                                                   Case("init", OLD_NOTEBOOK["strength"] * 1347, old=True)])
HALF_CASES = [Case("adam", c) for c in C_GRID]  # N = 673: does the c that works move as 1/N?


# ----------------------------------------------------------------------------
# One model: a train function and an accuracy.


@dataclasses.dataclass(frozen=True)
class Model:
  """What the steps need of a model: train ``epochs`` with a transform, test accuracy, N, steps per epoch."""

  name: str
  train: Any      # (tx, params, epochs, seed) -> training.Trained
  accuracy: Any   # params -> float
  init: Any       # seed -> params
  num_examples: int
  steps_per_epoch: int

  def epochs(self, steps: int) -> int:
    return max(1, round(steps / self.steps_per_epoch))


def digits_model(n: int | None = None) -> Model:
  """The digits MLP, on its whole training split or its first ``n`` images."""
  task = digits.DigitsTask.load(0)
  if n is not None:
    d = task.data
    task = dataclasses.replace(task, data=dataclasses.replace(d, x_train=d.x_train[:n], y_train=d.y_train[:n]))
  n = len(task.data.y_train)
  return Model(f"digits MLP, N={n}", task.train, task.accuracy, task.init, n, n // task.batch)


def lenet_model() -> Model:
  """LeNet-300-100 on compress_mnist's 4000 / 1000 MNIST images, batch 100."""
  from benchmarks import compress_mnist as cm  # Imported here: the quick mode does not need it.

  data = datasets.load_mnist(cm.TRAIN_SIZE, cm.TEST_SIZE, seed=cm.SPLIT_SEED)
  net = cm.LeNet300100()
  loss = training.cross_entropy(training.flax_apply(net))

  def train(tx, params, epochs, seed):
    return training.train(loss, tx, params, data.x_train, data.y_train, epochs, batch=cm.BATCH,
                        shuffle=jax.random.key(seed + 1000))

  def accuracy(params):
    return 1.0 - training.error_percent(cm.predictor("LeNet-300-100"), params, data.x_test, data.y_test) / 100

  return Model("LeNet-300-100, N=4000", train, accuracy, lambda seed: training.init_flax(net, 784, seed),
               cm.TRAIN_SIZE, cm.TRAIN_SIZE // cm.BATCH)


# ----------------------------------------------------------------------------
# The steps.


def compress(model: Model, tx: optax.GradientTransformation, start: Any, retrain_epochs: int,
             finetune_epochs: int, seed: int) -> dict:
  """Steps 2-5 from ``start``: retrain, merge, quantize, fine-tune, report."""
  t0 = time.perf_counter()
  run = model.train(tx, start, retrain_epochs, seed + 100)
  merged = ss.merge_components(ss.get_mixture(run.state), MERGE_THRESHOLD)
  q = ss.quantize(run.params, merged)
  deq = ss.dequantize(q)
  tuned = model.train(optax.chain(ss.keep_clusters(q), optax.adam(LEARNING_RATE)), deq, finetune_epochs,
                      seed + 200).params
  report = ss.compression_report(q, params=run.params, mixture=merged)
  return {"retrained_accuracy": model.accuracy(run.params), "quantized_accuracy": model.accuracy(deq),
          "finetuned_accuracy": model.accuracy(tuned), "ratio": report.ratio,
          "components_after_merge": merged.num_components,
          "idle_components": sum(c.idle for c in report.components),
          "relative_change": {r.path: r.relative_change for r in report.quality},
          "max_relative_change": max(r.relative_change for r in report.quality),
          "snapped_to_zero": {r.path: r.snapped_to_zero for r in report.quality},
          "warnings": list(report.warnings), "seconds": time.perf_counter() - t0}


def pretrain(model: Model, start: str, seed: int, steps: int) -> Any:
  """Step 1: Adam 1e-3 ("adam") or SGD 0.05 with momentum 0.9 ("sgd", benchmarks/demo.py's); "init": none."""
  params = model.init(seed)
  if start == "init":
    return params
  tx = optax.adam(LEARNING_RATE) if start == "adam" else optax.sgd(0.05, momentum=0.9)
  return model.train(tx, params, model.epochs(steps), seed).params


def digits_runs(cfg: dict, bar: Any) -> list[dict]:
  """The digits MLP: every case of ``cfg["cases"]`` (N = 1347) and ``cfg["half_cases"]`` (N = 673)."""
  records = []
  for size, cases in ((None, cfg["cases"]), (673, cfg["half_cases"])):
    if not cases:
      continue
    model = digits_model(size)
    retrain, finetune = model.epochs(cfg["retrain_steps"]), model.epochs(cfg["finetune_steps"])
    for seed in cfg["seeds"]:
      starts = {s: pretrain(model, s, seed, cfg["pretrain_steps"]) for s in sorted({c.start for c in cases})}
      for case in cases:
        tx = old_notebook_setting() if case.old else recipe(case.c / model.num_examples, case.zero_weight,
                                                            case.gradient)
        epochs = cfg["old_epochs"] if case.old else retrain
        rec = compress(model, tx, starts[case.start], epochs, finetune, seed)
        start_acc = math.nan if case.start == "init" else model.accuracy(starts[case.start])
        records.append({"model": model.name, "N": model.num_examples, "seed": seed, "start": case.start,
                        "setting": case.setting, "c": case.c, "strength": case.c / model.num_examples,
                        "zero_weight": case.zero_weight, "pretrained_accuracy": start_acc, **rec})
        bar.update(1)
  return records


def lenet_run() -> dict:
  """LeNet-300-100, seed 0: compress_mnist's pretraining, then the recipe at C_RECIPE / 4000."""
  model = lenet_model()
  pretrained = model.train(optax.adam(LEARNING_RATE), model.init(0), LENET_PRETRAIN_EPOCHS, 0).params
  rec = compress(model, recipe(C_RECIPE / model.num_examples), pretrained, LENET_RETRAIN_EPOCHS, 5, 0)
  return {"model": model.name, "N": model.num_examples, "seed": 0, "start": "adam",
          "setting": f"recipe, pi0={ZERO_WEIGHT:g}", "c": C_RECIPE, "strength": C_RECIPE / model.num_examples,
          "zero_weight": ZERO_WEIGHT,
          "pretrained_accuracy": model.accuracy(pretrained), **rec}


# ----------------------------------------------------------------------------
# Summary and output.


def summarize(records: list[dict]) -> list[dict]:
  """Mean ± std over seeds per (model, start, setting, c)."""
  keys = []
  for r in records:
    k = (r["model"], r["start"], r["setting"], r["c"])
    if k not in keys:
      keys.append(k)
  rows = []
  for k in keys:
    group = [r for r in records if (r["model"], r["start"], r["setting"], r["c"]) == k]
    row = {"model": k[0], "start": k[1], "setting": k[2], "c": k[3], "N": group[0]["N"],
           "strength": group[0]["strength"]}
    for f in ("pretrained_accuracy", "retrained_accuracy", "quantized_accuracy", "finetuned_accuracy", "ratio",
              "max_relative_change"):
      row[f] = common.mean_std([r[f] for r in group])
    row["warned"] = sum(bool(r["warnings"]) for r in group)
    row["runs"] = len(group)
    rows.append(row)
  return rows


def table(rows: list[dict]) -> str:
  def fmt(stat):
    return "-" if not stat["n"] else common.fmt_mean_std(stat, digits=1, scale=100.0, single=True)

  out = [(r["model"], r["start"], r["setting"], f"{r['c']:.3g}",
          f"{r['strength']:.2g}", fmt(r["pretrained_accuracy"]), fmt(r["retrained_accuracy"]),
          fmt(r["quantized_accuracy"]), fmt(r["finetuned_accuracy"]), f"{r['ratio']['mean']:.1f}",
          f"{r['max_relative_change']['mean']:.3f}", f"{r['warned']}/{r['runs']}") for r in rows]
  return common.format_table(
      ("model", "start", "setting", "c", "strength", "pretrained %", "retrained %", "quantized %",
       "fine-tuned %", "ratio", "max rel. change", "warned"), out, align="<<<>>>>>>>>>")


def main(argv: list[str] | None = None) -> int:
  """Runs the digits grid and controls (and LeNet-300-100 in full mode), prints the table, writes the JSON."""
  parser = common.argument_parser("recipe", __doc__, "digits only, one seed, c = 0.012, a few steps")
  args = parser.parse_args(argv)
  if args.quick:
    cfg = dict(QUICK, cases=[Case("adam")], half_cases=[])
  else:
    cfg = dict(seeds=SEEDS, pretrain_steps=PRETRAIN_STEPS, retrain_steps=RETRAIN_STEPS, finetune_steps=FINETUNE_STEPS,
               old_epochs=OLD_NOTEBOOK["epochs"], lenet=True, cases=FULL_CASES, half_cases=HALF_CASES)
  recorder = common.Recorder("recipe", ("scikit-learn", "mlxtend"))
  total = len(cfg["seeds"]) * (len(cfg["cases"]) + len(cfg["half_cases"])) + int(cfg["lenet"])
  with common.progress_bar(total, "recipe", enabled=not args.no_progress) as bar:
    records = digits_runs(cfg, bar)
    if cfg["lenet"]:
      records.append(lenet_run())
      bar.update(1)
  rows = summarize(records)
  elapsed = recorder.stop()
  print(f"recipe: {'quick' if args.quick else 'full'} mode, backend {jax.default_backend()}, {elapsed:.0f} s")
  print(table(rows))
  print("accuracy on the test split, mean ± std over seeds; c = strength × N; ratio: compression_report's CSR "
        "ratio (whole model); max rel. change: the largest ‖w_q − w‖/‖w‖ over the kernels; warned: runs "
        f"whose compression_report warned (threshold {ss.CompressionReport.RELATIVE_CHANGE_WARNING:g}).")
  path = recorder.write(args.out, {
      "settings": {"mode": "quick" if args.quick else "full",
                   "recipe": f"optax.chain(ss.mixture_prior({COMPONENTS}, c / N, zero_weight={ZERO_WEIGHT}, "
                             f"mixture_update='em', precision_prior={PRECISION_PRIOR}, zero_precision_prior="
                             f"{ZERO_PRECISION_PRIOR}), optax.adam({LEARNING_RATE})) from pretrained weights; "
                             f"merge_components({MERGE_THRESHOLD}); quantize; keep_clusters + adam({LEARNING_RATE})",
                   **{k: [dataclasses.asdict(c) for c in v] if k.endswith("cases") else v for k, v in cfg.items()},
                   "lenet": {"pretrain_epochs": LENET_PRETRAIN_EPOCHS, "retrain_epochs": LENET_RETRAIN_EPOCHS,
                             "finetune_epochs": 5, "batch": 100} if cfg["lenet"] else None},
      "results": rows, "runs": records})
  print(f"\nwrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
