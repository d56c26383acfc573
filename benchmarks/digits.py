"""The digits MLP that the demo and the notebooks train: model, data and loop in one object.

    task = digits.DigitsTask.load(seed=0)
    params = task.init(seed=0)
    trained = task.train(optax.adam(1e-3), params, epochs=20)
    task.accuracy(trained.params)          # on the test split
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from benchmarks import datasets
from benchmarks import training

HIDDEN = (64, 64)
CLASSES = 10
BATCH = 64


class MLP(nn.Module):
  """ReLU hidden layers of the given widths, then a Dense layer of class logits."""

  hidden: tuple[int, ...] = HIDDEN
  classes: int = CLASSES

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.classes)(x)


@dataclasses.dataclass(frozen=True)
class DigitsTask:
  """scikit-learn's 8x8 digits (75/25 split) and an MLP classifier for them.

  Attributes:
    data: the standardized images and labels (``datasets.load_digits``).
    model: the Flax module (default: 64-64 ReLU hidden layers).
    batch: the minibatch size of :meth:`train`.
  """

  data: datasets.Data
  model: nn.Module = MLP()
  batch: int = BATCH

  @classmethod
  def load(cls, seed: int = 0, **kwargs: Any) -> "DigitsTask":
    """The task on the digits split of ``seed``."""
    return cls(datasets.load_digits(seed), **kwargs)

  @functools.cached_property
  def apply(self) -> training.ApplyFn:
    """``(params, x) -> logits``."""
    return training.flax_apply(self.model)

  @functools.cached_property
  def predict(self) -> Any:
    """The jitted class predictor of :func:`training.predictor`."""
    return training.predictor(self.apply)

  def init(self, seed: int = 0) -> Any:
    """The model's parameters from ``jax.random.key(seed)``."""
    return training.init_flax(self.model, self.data.x_train.shape[1], seed)

  def train(self, tx: optax.GradientTransformation, params: Any, epochs: int, seed: int = 0) -> training.Trained:
    """Minibatch training with ``tx``; the data order depends only on ``seed``."""
    return training.train(training.cross_entropy(self.apply), tx, params, self.data.x_train, self.data.y_train,
                        epochs, batch=self.batch, shuffle=jax.random.key(seed + 1))

  def accuracy(self, params: Any, split: str = "test") -> float:
    """Fraction of the ``"test"`` or ``"train"`` split classified correctly."""
    x, y = (self.data.x_test, self.data.y_test) if split == "test" else (self.data.x_train, self.data.y_train)
    return training.accuracy(self.predict, params, np.asarray(x), np.asarray(y))
