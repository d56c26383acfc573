"""Training and evaluation shared by the benchmark scripts and the notebooks.

One minibatch loop serves every classifier here: :func:`train` runs one jitted
``lax.scan`` per epoch (:func:`make_epoch`) over shuffled whole minibatches,
with any Optax transformation; ``tx.update`` always gets the parameters,
which the softshare transforms need. A typical use::

    data = datasets.load_digits()
    apply = training.flax_apply(model)
    params = training.init_flax(model, data.x_train.shape[1], seed=0)
    run = training.train(training.cross_entropy(apply), tx, params, data.x_train, data.y_train,
                       epochs=40, batch=64, shuffle=jax.random.key(1))
    acc = training.accuracy(training.predictor(apply), run.params, data.x_test, data.y_test)

The minibatch order comes from ``shuffle``: a JAX key (split once per epoch,
``jax.random.permutation``) or a NumPy ``Generator`` (``rng.permutation``);
either way the trailing partial batch is dropped, so an epoch has one shape
and compiles once.

Also here: :func:`init_flax`, :func:`kernel_mask` (the leaves named
``kernel``), :func:`kernels` and :func:`kernel_values` (the leaves with two or
more dimensions), :func:`sgd_prox` (SGD, then the weight-sharing prox at the
same learning rate), and the evaluation helpers :func:`predictor`,
:func:`count_correct`, :func:`accuracy` and :func:`error_percent`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]
LossFn = Callable[[Params, jax.Array, jax.Array], jax.Array]
EpochFn = Callable[..., tuple[Params, Any, jax.Array]]


# ----------------------------------------------------------------------------
# Models and parameters.


def flax_apply(model: Any) -> ApplyFn:
  """``(params, x) -> logits`` of a Flax linen module whose variables are only ``params``."""
  return lambda params, x: model.apply({"params": params}, x)


def init_flax(model: Any, features: int, seed: int) -> Params:
  """A Flax module's ``params`` for inputs of ``features`` values, from ``jax.random.key(seed)``."""
  return model.init(jax.random.key(seed), jnp.zeros((1, features), jnp.float32))["params"]


def kernel_mask(params: Params) -> Params:
  """True on the leaves named ``kernel`` (the Dense and Conv weights), False on biases."""
  return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def kernels(params: Params) -> list[np.ndarray]:
  """The leaves with two or more dimensions (kernels), as NumPy arrays, in tree order."""
  return [np.asarray(x) for x in jax.tree.leaves(params) if np.ndim(x) >= 2]


def kernel_values(params: Params) -> np.ndarray:
  """Every kernel weight in one flat array (the leaves of :func:`kernels`, concatenated)."""
  return np.concatenate([k.ravel() for k in kernels(params)])


# ----------------------------------------------------------------------------
# Training.


def cross_entropy(apply_fn: ApplyFn) -> LossFn:
  """``loss(params, x, y)``: mean softmax cross-entropy of ``apply_fn``'s logits against integer labels."""

  def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y).mean()

  return loss


def make_epoch(loss_fn: LossFn, tx: optax.GradientTransformation) -> EpochFn:
  """Jitted ``epoch(params, state, x, y, order) -> (params, state, mean loss)``.

  ``order`` is a (steps, batch) array of row indices into ``x`` and ``y``; the
  epoch is one ``lax.scan`` of optimizer steps, one per row of ``order``. One
  compilation serves every call with the same shapes, so callers that train
  several seeds alike can build it once and pass it to :func:`train`.
  """

  def step(carry, batch):
    params, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  @jax.jit
  def epoch(params, state, x, y, order):
    (params, state), losses = jax.lax.scan(step, (params, state), (x[order], y[order]))
    return params, state, losses.mean()

  return epoch


def batch_orders(shuffle: Any, n: int, batch: int) -> Iterator[jax.Array]:
  """Endless (n // batch, batch) minibatch orders over ``n`` rows, one per epoch.

  ``shuffle`` is a JAX key (split before each epoch, the subkey permutes) or
  a ``numpy.random.Generator`` (its ``permutation``, advancing it).
  """
  steps = n // batch
  if isinstance(shuffle, np.random.Generator):
    while True:
      yield jnp.asarray(shuffle.permutation(n)[: steps * batch].reshape(steps, batch))
  key = shuffle
  while True:
    key, sub = jax.random.split(key)
    yield jax.random.permutation(sub, n)[: steps * batch].reshape(steps, batch)


def sgd_prox(learning_rate: optax.ScalarOrSchedule, momentum: float, strength: float | None = None, *,
             l1: float = 0.0, axis: Any = 0, mask: Any = None) -> optax.GradientTransformation:
  """SGD with momentum, then (given a ``strength``) ``ss.weight_sharing_prox`` at the same learning rate.

  The prox comes last in the chain and shares the optimizer's learning rate
  (a number or a schedule), so every step is a proximal step of
  loss + strength · R (+ l1 · ‖w‖₁) on the leaves that ``mask`` selects.
  """
  import softshare_jax as ss  # Imported here: the training loop itself needs only JAX and Optax.

  sgd = optax.sgd(learning_rate, momentum=momentum)
  if strength is None:
    return sgd
  return optax.chain(sgd, ss.weight_sharing_prox(strength, learning_rate, l1=l1, axis=axis, mask=mask))


@dataclasses.dataclass
class Trained:
  """What :func:`train` returns: final parameters, optimizer state, mean loss per epoch."""

  params: Params
  state: Any
  losses: list[float]


def train(loss_fn: LossFn, tx: optax.GradientTransformation, params: Params, x: Any, y: Any,
          epochs: int, *, batch: int, shuffle: Any, state: Any = None, epoch_fn: EpochFn | None = None,
          bar: Any = None, show_loss: bool = False) -> Trained:
  """Minibatch training: ``epochs`` jitted scans over shuffled whole batches of ``(x, y)``.

  ``shuffle`` orders the batches (see :func:`batch_orders`). ``state``
  continues an optimizer state (default ``tx.init(params)``); ``epoch_fn`` is
  a :func:`make_epoch` of the same loss and ``tx`` to reuse a compilation.
  ``bar`` (a ``common.progress_bar``) advances by one per epoch and, with
  ``show_loss``, shows the epoch's loss.
  """
  state = tx.init(params) if state is None else state
  epoch = make_epoch(loss_fn, tx) if epoch_fn is None else epoch_fn
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  orders = batch_orders(shuffle, int(xj.shape[0]), batch)
  losses = []
  for _ in range(epochs):
    params, state, loss = epoch(params, state, xj, yj, next(orders))
    losses.append(float(loss))
    if bar is not None:
      bar.update(1)
      if show_loss:
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
  return Trained(params, state, losses)


# ----------------------------------------------------------------------------
# Evaluation.


def predictor(apply_fn: ApplyFn) -> Callable[[Params, jax.Array], jax.Array]:
  """Jitted ``(params, x) -> predicted class`` (the argmax of ``apply_fn``'s logits)."""
  return jax.jit(lambda params, x: jnp.argmax(apply_fn(params, x), axis=-1))


def count_correct(predict: Callable, params: Params, x: Any, y: Any, chunk: int | None = None) -> int:
  """How many rows of ``x`` ``predict`` classifies as ``y``, ``chunk`` rows at a time (None: all at once)."""
  y = np.asarray(y)
  step = len(y) if chunk is None else chunk
  correct = 0
  for s in range(0, len(y), max(step, 1)):
    pred = np.asarray(predict(params, jnp.asarray(x[s:s + step])))
    correct += int(np.sum(pred == y[s:s + step]))
  return correct


def accuracy(predict: Callable, params: Params, x: Any, y: Any, chunk: int | None = None) -> float:
  """Fraction of ``(x, y)`` classified correctly (an exact count over the rows)."""
  return count_correct(predict, params, x, y, chunk) / len(y)


def error_percent(predict: Callable, params: Params, x: Any, y: Any, chunk: int | None = 1000) -> float:
  """Error in percent, ``100 · wrong / n`` (evaluated ``chunk`` rows at a time)."""
  wrong = len(y) - count_correct(predict, params, x, y, chunk)
  return 100.0 * wrong / len(y)
