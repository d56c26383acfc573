"""The weight-sharing regularizer's proximal step as an Optax transform, after any optimizer.

Proximal gradient descent on ``loss + λ R(w) + l1 ‖w‖₁`` (docs/design.md §4.2):
the optimizer's step lands on the exact prox of the tentative new weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from softshare_jax import _checks
from softshare_jax import masks
from softshare_jax._groups import Axis
from softshare_jax.sharing import METHODS
from softshare_jax.sharing import prox_weight_sharing


class WeightSharingProxState(NamedTuple):
  """State of :func:`weight_sharing_prox`: the step count, for schedules."""

  count: jax.Array


def weight_sharing_prox(
    strength: optax.ScalarOrSchedule,
    learning_rate: optax.ScalarOrSchedule,
    *,
    l1: float = 0.0,
    axis: Axis = None,
    mask: Any = None,
    method: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  """Proximal step of the weight-sharing regularizer, after any optimizer.

  Turns the optimizer's step ``u`` into ``prox(w + u) − w``, so that
  ``optax.apply_updates`` lands on the prox of the tentative new weights:

      w ← prox_{η_t·λ·R + η_t·l1·‖·‖₁}(w + u),   η_t = learning_rate(count)

  This is proximal gradient descent on ``loss + λ R(w) + l1 ‖w‖₁``. Place it
  LAST in the chain, after the optimizer has produced its final step (its
  ``learning_rate`` should be the optimizer's, so the prox step matches).

  Args:
    strength: λ >= 0, float or schedule.
    learning_rate: η >= 0, float or optax schedule (the optimizer's).
    l1: weight of an ℓ1 term, scaled by the learning rate like ``strength``.
    axis: the axes that form one group (see :func:`prox_weight_sharing`).
    mask: which leaves (a pytree of bools or a callable, as in ``optax.masked``;
      default: every floating-point leaf). Others pass through.
    method: as in :func:`prox_weight_sharing`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.
    Under ``optax.inject_hyperparams`` (to change ``strength`` or
    ``learning_rate`` during training), mark an int ``axis`` static:
    ``optax.inject_hyperparams(ss.weight_sharing_prox, static_args=("axis",))``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import softshare_jax as ss
    >>> params = {"w": jnp.array([0.30, 0.31, -0.2, 0.9])}
    >>> tx = optax.chain(optax.sgd(0.1), ss.weight_sharing_prox(0.5, 0.1))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.zeros_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> ss.sharing_stats(params).total.distinct  # 0.30 and 0.31 merged
    3
  """
  _checks.check_nonnegative("strength", strength)
  _checks.check_nonnegative("learning_rate", learning_rate)
  _checks.check_nonnegative("l1", l1)
  _checks.check_choice("method", method, METHODS)

  def init_fn(params):
    del params
    return WeightSharingProxState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _checks.require_params("weight_sharing_prox", params)
    lr = _checks.value_at(learning_rate, state.count)
    t = _checks.value_at(strength, state.count) * lr
    s = l1 * lr
    keep = masks.resolve_mask(mask, params, masks.is_float_leaf)

    def step(u, p, on):
      if u is None or not on:
        return u
      w = p.astype(jnp.float32) + u.astype(jnp.float32)
      new = prox_weight_sharing(w, t, l1=s, axis=axis, method=method)
      return (new - p.astype(jnp.float32)).astype(u.dtype)

    updates = jax.tree.map(step, updates, params, keep, is_leaf=lambda u: u is None)
    return updates, WeightSharingProxState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
