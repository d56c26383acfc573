"""Weight sharing on a small network, end to end (about half a minute on CPU).

    python -m benchmarks.demo        (or: make demo)

Trains a 64-64-10 Flax MLP on scikit-learn's 8x8 digits twice with the same
seed, data order and optimizer (SGD with momentum):

* plain: the optimizer alone;
* prox: the same optimizer chained with ``ss.weight_sharing_prox`` LAST, which
  turns each step into a proximal step of the weight-sharing regularizer
  R(w) = 1/(d−1) Σ_{i>j} |w_i − w_j| (one group per output neuron of each
  kernel, ``axis=0``), so weights feeding a neuron merge into shared values.

It prints the test accuracy of both and ``ss.sharing_stats`` of both: the
number of distinct values per leaf is what the prox brings down.

A third run trains with Adam and ``ss.mixture_prior`` (Nowlan & Hinton's soft
weight sharing with Ullrich et al.'s zero component): it prints the learned
mixture and writes ``demo_mixture.png``, the kernel weights' histogram with the
mixture density on top.

Last, compression (Ullrich et al. 2017): the plain run is retrained with a
stronger prior whose mixture follows the weights by EM under Gamma
hyper-priors; close components are merged (``ss.merge_components``), every kernel weight takes
the mean of its most responsible component (``ss.quantize``), a few epochs of
fine-tuning keep the clusters (``ss.keep_clusters``), and the result is written
with ``ss.save_quantized`` to ``demo_model.safetensors``. It prints the test
accuracy at each stage, ``ss.compression_report`` (Deep Compression's CSR bit
count) and the file's size; k-means clustering of the plain run's kernels
(``ss.cluster_weights``, 16 clusters) is the baseline.

The data and the training loop are the benchmarks' shared ones
(``digits.DigitsTask``: ``datasets.load_digits``, ``training.train``); the figure and the model file go to
the current directory.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import optax

import softshare_jax as ss

from benchmarks import common
from benchmarks import datasets
from benchmarks import digits
from benchmarks import training

SEED = 0
LEARNING_RATE = 0.05
MOMENTUM = 0.9
EPOCHS = 40
# λ of the weight-sharing regularizer (each step moves a weight by at most
# λ·η). Measured on CPU with this seed (test accuracy, distinct kernel values
# of 8832): plain 0.967 / 8831; 0.01: 0.973 / ~2600, a median of 7-9 distinct
# values per hidden neuron; 0.03: 0.967 / ~800, but most hidden neurons
# collapse to one value; 0.1: 0.949 / ~540; 0.3: every neuron collapses
# (chance accuracy).
STRENGTH = 0.01
SHARING_AXIS = 0  # One group per output neuron of a Dense kernel (in, out).


# The Dense kernels share weights; biases are left alone.
kernels_only = training.kernel_mask


# ----------------------------------------------------------------------------
# Optimizers.


def plain_optimizer() -> optax.GradientTransformation:
  """SGD with momentum."""
  return training.sgd_prox(LEARNING_RATE, MOMENTUM)


def prox_optimizer(strength: float = STRENGTH) -> optax.GradientTransformation:
  """The same SGD, then the weight-sharing prox (last in the chain, same learning rate)."""
  return training.sgd_prox(LEARNING_RATE, MOMENTUM, strength, axis=SHARING_AXIS, mask=kernels_only)


# ----------------------------------------------------------------------------
# Training.


@dataclasses.dataclass
class Run:
  """One training run: its parameters, accuracies, time and final optimizer state."""

  name: str
  params: Any
  train_accuracy: float
  test_accuracy: float
  seconds: float
  opt_state: Any = None


def train(name: str, task: digits.DigitsTask, tx: optax.GradientTransformation,
          epochs: int = EPOCHS, seed: int = SEED, init: Any = None) -> Run:
  """Minibatch training (batch ``digits.BATCH``); the same data order for every run of a seed."""
  start = time.perf_counter()
  trained = task.train(tx, task.init(seed) if init is None else init, epochs, seed)
  params = jax.block_until_ready(trained.params)
  return Run(name, params, task.accuracy(params, "train"), task.accuracy(params), time.perf_counter() - start,
             trained.state)


# ----------------------------------------------------------------------------
# Report.


def print_header(data: datasets.Data) -> None:
  """What is trained, on what, with which settings."""
  print("softshare_jax demo: weight-sharing prox on a 64-64-10 MLP, sklearn digits")
  print(f"train {data.x_train.shape[0]}, test {data.x_test.shape[0]}, {EPOCHS} epochs of batch {digits.BATCH}, "
        f"SGD lr {LEARNING_RATE} momentum {MOMENTUM}; prox strength {STRENGTH}, axis={SHARING_AXIS}, "
        f"kernels only; JAX backend {jax.default_backend()}")
  print()


def print_comparison(runs: list[Run]) -> None:
  """Accuracies, distinct kernel values and seconds of every run."""
  width = max(len(r.name) for r in runs)
  print(f"{'run':<{width}}  {'train acc':>9}  {'test acc':>8}  {'distinct':>8}  {'seconds':>7}")
  for r in runs:
    distinct = ss.sharing_stats(r.params, mask=kernels_only).total.distinct
    print(f"{r.name:<{width}}  {r.train_accuracy:>9.4f}  {r.test_accuracy:>8.4f}  {distinct:>8}  {r.seconds:>7.1f}")
  print("(distinct: distinct kernel values, summed over the kernels)")
  print()


def print_sharing(runs: list[Run]) -> None:
  """``ss.sharing_stats`` of every run."""
  for r in runs:
    print(f"sharing_stats, {r.name}:")
    print(ss.sharing_stats(r.params))
    print()


def print_per_neuron(run: Run) -> None:
  """Distinct values per output neuron (the prox's groups), per kernel."""
  print(f"distinct values per output neuron, {run.name} (min / median / max over neurons; "
        "collapsed: neurons whose inputs all share one weight):")
  for path, leaf in jax.tree_util.tree_flatten_with_path(run.params)[0]:
    if getattr(path[-1], "key", None) != "kernel":
      continue
    w = np.asarray(leaf)
    per = [np.unique(w[:, j]).size for j in range(w.shape[1])]
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    collapsed = sum(p == 1 for p in per)
    print(f"  {name:<16} {w.shape[0]:>3} inputs: {min(per)} / {int(np.median(per))} / {max(per)}, "
          f"collapsed {collapsed} of {len(per)}")
  print()


# ----------------------------------------------------------------------------
# Soft weight sharing: Adam + the mixture prior.

MIXTURE_COMPONENTS = 16
# τ/N in Ullrich et al.'s notation: the weight of the summed negative log prior
# against the mean cross-entropy.
MIXTURE_STRENGTH = 3e-5
MIXTURE_LEARNING_RATE = 3e-3
PNG = "demo_mixture.png"


def mixture_optimizer() -> optax.GradientTransformation:
  """The mixture prior (16 components and the zero component), then Adam."""
  return optax.chain(
      # The flat precision priors this demo was tuned with (the default is now "auto").
      ss.mixture_prior(num_components=MIXTURE_COMPONENTS, strength=MIXTURE_STRENGTH, precision_prior=None,
                       zero_precision_prior=None),
      optax.adam(MIXTURE_LEARNING_RATE),
  )


def print_mixture(run: Run) -> Any:
  """Prints the mixture a run learned; returns it."""
  mixture = ss.get_mixture(run.opt_state)
  print("learned mixture (component 0 is the zero component):")
  rows = [[j, f"{float(m):+.4f}", f"{float(s):.4f}", f"{float(w):.4f}"]
          for j, (m, s, w) in enumerate(zip(mixture.means, mixture.stddevs, mixture.weights))]
  print(common.format_table(["j", "mean", "stddev", "weight"], rows, align=">>>>"))
  print()
  return mixture


def plot_mixture(run: Run, mixture: Any, path: str = PNG) -> str:
  """Histogram of the kernel weights with the learned mixture density on top."""
  w = training.kernel_values(run.params)
  fig, ax = common.pyplot().subplots(figsize=(8, 4))
  common.hist_with_mixture(ax, {"kernel weights": w}, mixture, float(w.min()) - 0.05, float(w.max()) + 0.05,
                            bins=200, label="learned mixture density")
  ax.set_title(f"digits MLP, Adam + mixture_prior ({MIXTURE_COMPONENTS} + zero component)")
  fig.tight_layout()
  common.save_figure(fig, path)
  return os.path.abspath(path)


# ----------------------------------------------------------------------------
# Compression: merge, quantize, fine-tune with the clusters kept, export.

# Retraining for compression (Ullrich et al.'s pipeline: pretrain, then retrain
# with the prior). The mixture follows the weights by EM, with a Gamma(2, 2.5e-3)
# prior on every precision: it caps a component's precision near (α−1)/β = 400
# (σ ≈ 0.05) while few weights are in it, so no component collapses onto a
# single weight (plain EM does). Measured on CPU with this seed (test accuracy
# float / quantized, CSR ratio): strength 1e-4: 0.962 / 0.489, 4.8x (the zero
# component stays wide and swallows weights); 2e-4: 0.967 / 0.962, 24.6x;
# 3e-4: 0.951 / 0.949, 26x; 1e-3: 0.844 / 0.844, 29x.
COMPRESS_STRENGTH = 2e-4
COMPRESS_ZERO_WEIGHT = 0.9
COMPRESS_PRECISION_PRIOR = (2.0, 2.5e-3)
COMPRESS_EPOCHS = 40
COMPRESS_LEARNING_RATE = 1e-3
MERGE_THRESHOLD = 1e-2  # symmetric KL below which two components merge
FINETUNE_EPOCHS = 5
FINETUNE_LEARNING_RATE = 1e-3
MODEL_FILE = "demo_model.safetensors"


def compression_optimizer() -> optax.GradientTransformation:
  """The stronger prior for compression (EM mixture updates under Gamma hyper-priors), then Adam."""
  return optax.chain(
      ss.mixture_prior(MIXTURE_COMPONENTS, COMPRESS_STRENGTH, zero_weight=COMPRESS_ZERO_WEIGHT,
                       mixture_update="em", precision_prior=COMPRESS_PRECISION_PRIOR,
                       zero_precision_prior=COMPRESS_PRECISION_PRIOR),
      optax.adam(COMPRESS_LEARNING_RATE),
  )


def compress_run(task: digits.DigitsTask, plain: Run) -> None:
  """Retrains the plain run with the prior, quantizes, fine-tunes with the clusters kept, writes it."""
  run = train("retrained", task, compression_optimizer(), epochs=COMPRESS_EPOCHS, init=plain.params)
  merged = ss.merge_components(ss.get_mixture(run.opt_state), MERGE_THRESHOLD)
  q = ss.quantize(run.params, merged)
  quantized_acc = task.accuracy(ss.dequantize(q))
  tuned = train("fine-tuned", task, optax.chain(ss.keep_clusters(q), optax.adam(FINETUNE_LEARNING_RATE)),
                epochs=FINETUNE_EPOCHS, init=ss.dequantize(q))
  q = ss.quantize(tuned.params, None)  # the clusters were kept: its distinct values are the codebook
  ss.save_quantized(MODEL_FILE, q)
  loaded = ss.load_quantized(MODEL_FILE, like=tuned.params)
  loaded_acc = task.accuracy(ss.dequantize(loaded))
  baseline = ss.cluster_weights(plain.params, 16, key=jax.random.key(SEED))
  baseline_acc = task.accuracy(ss.dequantize(baseline))
  pruned = ss.cluster_weights(plain.params, 16, key=jax.random.key(SEED), prune_fraction=0.9)
  pruned_acc = task.accuracy(ss.dequantize(pruned))
  print(f"compression: the plain run retrained {COMPRESS_EPOCHS} epochs with mixture_prior (EM), "
        f"{merged.num_components} components after merging:")
  rows = [
      ["plain run, float32", f"{plain.test_accuracy:.4f}", "1.0x"],
      ["retrained with the prior, float32", f"{run.test_accuracy:.4f}", "1.0x"],
      ["quantized to the merged mixture", f"{quantized_acc:.4f}", f"{ss.compression_report(q).ratio:.1f}x"],
      [f"+ {FINETUNE_EPOCHS} epochs with keep_clusters", f"{tuned.test_accuracy:.4f}", ""],
      ["loaded back from the file", f"{loaded_acc:.4f}", ""],
      ["baseline: k-means, 16 clusters", f"{baseline_acc:.4f}", f"{ss.compression_report(baseline).ratio:.1f}x"],
      ["baseline: 90% pruned + k-means, 16", f"{pruned_acc:.4f}", f"{ss.compression_report(pruned).ratio:.1f}x"],
  ]
  print(common.format_table(["model", "test acc", "CSR ratio"], rows, align="<>>"))
  print()
  print(f"compression report of {MODEL_FILE}:")
  print(ss.compression_report(loaded, path=MODEL_FILE))


def main(argv: list[str] | None = None) -> int:
  """Runs the sections in turn and prints their reports."""
  del argv
  start = time.perf_counter()
  task = digits.DigitsTask.load(SEED)
  print_header(task.data)
  runs: list[Run] = [
      train("plain", task, plain_optimizer()),
      train("prox", task, prox_optimizer()),
  ]
  runs.append(train("mixture", task, mixture_optimizer()))
  print_comparison(runs)
  print_sharing(runs)
  print_per_neuron(runs[1])
  mixture = print_mixture(runs[2])
  print(f"weight histogram with the mixture density: {plot_mixture(runs[2], mixture)}")
  print()
  compress_run(task, runs[0])
  print(f"demo finished in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
