"""The weight-sharing regularizer's proximal step as an Optax transform, after any optimizer.

Proximal gradient descent on ``loss + λ R(w) + l1 ‖w‖₁`` (docs/design.md §4.2):
the optimizer's step lands on the exact prox of the tentative new weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from softshare_jax import checks
from softshare_jax import sharding
from softshare_jax import masks
from softshare_jax.groups import Axis
from softshare_jax.groups import to_rows
from softshare_jax.sharing import compute_dtype
from softshare_jax.sharing import METHODS
from softshare_jax.sharing import prox_layout
from softshare_jax.sharing import prox_many


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

  Precision: the prox runs in float32 for float32 and narrower params and in
  float64 for float64 ones (under ``jax_enable_x64``); a step whose strength
  and l1 are both 0 returns ``u`` itself, bit for bit. For float32 and float64
  params the update is chosen so that ``optax.apply_updates`` lands exactly on
  the prox, which keeps the weights of a cluster bit-identical: always when
  every weight moves by less than half its magnitude, and otherwise wherever
  each member's move stays below the top of its own binade. To get there, a
  value smaller than its group's largest move ``B`` may shift by up to an ulp
  of ``|value| + B``. A cluster with a member whose move reaches a coarser
  float grid than its own (a small weight pulled across zero onto a larger
  value, say) may come back split by about an ulp of that move, and
  :func:`sharing_stats` counts the parts. bfloat16 and float16 params get the
  rounded ``prox − w``, the update closest to the exact step.

  Choosing ``strength`` (``benchmarks/prox_strength.py``). A step moves each
  weight by at most t = strength × learning_rate: in a group of d weights
  sorted ascending, the k-th moves by t·(2k − d − 1)/(d − 1) towards the
  middle, and weights that meet stick together at their mean. Neighbours
  approach each other by 2t/(d − 1) per step and d weights of spread σ lie
  about σ·√(2π)/d apart near the middle, so, the loss aside, merging starts
  once the accumulated pull T = t × steps reaches about σ, whatever d. The
  loss pulls the weights apart at every step, so in training it takes
  longer. Measured on the digits MLP (64-64-10, SGD lr 0.05 momentum 0.9,
  the prox last on the kernels, 21 steps per epoch, σ ≈ 0.125; mean of 2
  seeds; plain SGD 96.7 % test accuracy):

      strength  epochs  T/σ   axis=0: test %, distinct per    axis=None: test %, distinct
                                neuron (median, Dense_0/1/2)    per kernel (of 4096/4096/640)
      0.003     40       1.0  97.0, 63 / 64 / 64              96.8, 4084 / 4093 / 640
      0.01      10       0.8  97.1, 63 / 64 / 64              97.3, 4078 / 4084 / 639
      0.01      40       3.4  97.7,  9 /  8 / 46              97.8, 1231 / 744 / 622
      0.02      40       6.7  97.4,  1 /  2 / 16              97.0,  578 / 216 / 216
      0.05      10       4.2  96.6,  2 /  3 / 24              96.9,  490 / 277 / 264
      0.05      40      16.8  97.0,  1 /  1 /  5              96.8,  346 /  42 /  53
      0.1       40      33.6  95.0,  1 /  1 /  5              95.4,  270 /  20 /  34
      0.3       10      25.2  10.7,  1 /  1 /  1              10.2,    1 /   1 /   1

  Below T ≈ σ nothing merges; T ≈ 3σ leaves a handful of values per group at
  no cost; beyond T ≈ 7σ most neurons (``axis=0``) share one or two values;
  a per-step t of 0.12σ (strength 0.3) collapsed every group before the loss
  could hold it apart, while 0.04σ (strength 0.1) still trained. To reach
  k·σ over the planned steps: strength ≈ k·σ / (learning_rate × steps), k
  from 2 to 5, keeping t below about σ/25.

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
    Empty leaves pass through; a scalar leaf takes ``axis=None`` or ``()``
    (mask it out otherwise). A group holding a NaN or an infinity, after the
    step, comes back NaN (see :func:`prox_weight_sharing`).
    Under ``optax.inject_hyperparams`` (to schedule or change ``strength``,
    ``learning_rate`` or ``l1``), pass ``static_args=('axis', 'mask')``:
    optax turns an int ``axis`` into an array, and takes a callable ``mask``
    for a schedule and calls it with the step count instead of the params (a
    mask by path then fails inside your own function; a mask by leaf returns
    a single ``False``)::

        tx = optax.inject_hyperparams(ss.weight_sharing_prox, static_args=('axis', 'mask'))(
            strength=schedule, learning_rate=0.05, axis=0, mask=lambda p: ...)

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
  checks.check_nonnegative("strength", strength)
  checks.check_nonnegative("learning_rate", learning_rate)
  checks.check_nonnegative("l1", l1)
  checks.check_choice("method", method, METHODS)

  def init_fn(params):
    del params
    return WeightSharingProxState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params("weight_sharing_prox", params)
    lr = checks.check_schedule_value("learning_rate", checks.value_at(learning_rate, state.count))
    t = checks.check_schedule_value("strength", checks.value_at(strength, state.count)) * lr
    s = l1 * lr
    keep = masks.resolve_mask(mask, params, masks.is_float_leaf)

    identity = not (checks.is_traced(t) or checks.is_traced(s)) and t == 0 and s == 0
    tentative = []  # the leaves the prox touches, in the order tree_map visits them

    def collect(path, u, p, on):
      if u is None or not on or identity:
        return
      dtype = compute_dtype(jnp.promote_types(p.dtype, u.dtype))
      w = p.astype(dtype) + u.astype(dtype)
      try:
        prox_layout(w, axis)
      except ValueError as e:
        raise ValueError(f"weight_sharing_prox, leaf {masks.path_str(path)!r}: {e}") from None
      tentative.append(w)

    def step(path, u, p, on):
      if u is None or not on or identity:
        return u  # strength and l1 both 0: the identity, bit for bit
      new = proxes.pop(0)
      out = _landing_update(p, new, u.dtype, axis)
      out = jnp.where((jnp.asarray(t) == 0) & (jnp.asarray(s) == 0), u, out)
      return sharding.like(u, out)

    none = lambda u: u is None  # noqa: E731
    jax.tree_util.tree_map_with_path(collect, updates, params, keep, is_leaf=none)
    # One host call (or kernel) for all leaves that need no communication; the others where they live.
    proxes = prox_many(tentative, t, l1=s, axis=axis, method=method)
    updates = jax.tree_util.tree_map_with_path(step, updates, params, keep, is_leaf=none)
    return updates, WeightSharingProxState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _landing_update(p: jax.Array, new: jax.Array, dtype, axis: Axis) -> jax.Array:
  """An update ``u`` of ``dtype`` with ``optax.apply_updates(p, u)`` on ``new``, where floats allow.

  ``new`` is the prox in the compute dtype. Params narrower than float32 get
  ``new − p``, the update closest to the exact step (their own rounding is
  coarser than any landing error). float32 and float64 params should land on
  ``new`` exactly, and ``new − p`` does whenever ``new`` and ``p`` are within a
  factor of two of each other (Sterbenz). Beyond that, ``p + u`` reaches only
  a grid of about an ulp of the move, offset by the last bits of ``p``, so the
  weights of one cluster would round to different values. Every weight of a
  group moves by at most ``B`` (the group's largest move). When ``B <= |c|``,
  every member of a cluster at ``c`` is on its side of zero and below ``2c``,
  and ``c − p`` lands (but for rounding ties). Otherwise every member lies
  within ``|c| + B`` of 0 and its ulp divides ``G = ulp(|c| + B)``: aiming at
  ``c`` rounded to a multiple of ``G`` (the same aim for every member: it
  depends on ``c`` and ``B`` only) makes ``aim − p`` exact for all of them,
  unless a member's move reaches a binade above its own and its last bit
  disagrees. That moves a value by at most half an ulp of ``|c| + B``, an ulp
  of the group's largest move; a weight that cannot land on its aim keeps
  ``new − p``.

  Example:
    >>> import jax.numpy as jnp
    >>> p = jnp.array([0.3, -0.05, 0.02])
    >>> new = jnp.full(3, 0.0123457)
    >>> p + (new - p) == new  # rounding splits the cluster
    Array([False, False,  True], dtype=bool)
    >>> u = _landing_update(p, new, jnp.float32, None)
    >>> int(jnp.unique(p + u).size)
    1
  """
  wide = new.dtype
  plain = (new - p.astype(wide)).astype(dtype)
  if jnp.finfo(p.dtype).bits < 32 or jnp.finfo(dtype).bits < 32 or p.size == 0:
    return plain
  target = new.astype(p.dtype)
  moves, back = to_rows(jnp.abs(target - p).astype(wide), axis)
  bound = back(jnp.broadcast_to(jnp.max(moves, axis=1, keepdims=True), moves.shape)).astype(p.dtype)
  # Rounded up: a sum rounded down across a power of two would halve the grid.
  grid = jnp.spacing(jnp.nextafter(jnp.abs(target) + bound, jnp.asarray(jnp.inf, p.dtype)))
  aim = jnp.round(target / grid) * grid
  aim = jnp.where(jnp.isfinite(aim) & (bound > jnp.abs(target)), aim, target)
  u = (aim.astype(wide) - p.astype(wide)).astype(dtype)
  return jnp.where((p + u).astype(p.dtype) == aim, u, plain)
