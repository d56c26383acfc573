"""Groups: which weights of a leaf share one regularizer, as ``axis`` names them.

``axis`` is the set of axes that form one group, like a reduction axis:
``None`` makes the whole leaf one group; ``axis=0`` on a Dense kernel
``(in, out)`` gives one group per output neuron. Every group-wise operation
works on the ``(groups, d)`` rows that :func:`to_rows` makes.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from softshare_jax.checks import is_traced

Axis = Union[None, int, Sequence[int]]


def group_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
  if axis is None:
    return tuple(range(ndim))
  if isinstance(axis, (jax.Array, np.ndarray)) and np.ndim(axis) == 0 and not is_traced(axis):
    axis = int(axis)
  if not isinstance(axis, (int, np.integer, tuple, list)):
    raise ValueError(
        f"axis must be None, an int or a tuple of ints, got {type(axis).__name__}. "
        "Under optax.inject_hyperparams, pass static_args=('axis',)."
    )
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  out = []
  for a in axes:
    # A scalar has no axis to name: only None or () group it.
    if not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
      raise ValueError(f"axis {axis!r} is out of range for an array of rank {ndim}.")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"axis {axis!r} repeats an axis.")
  return tuple(sorted(out))


def to_rows(x: jax.Array, axis: Axis) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
  """Reshapes ``x`` to ``(groups, d)``; returns the rows and the inverse map.

  Either size may be 0 (an empty leaf, or a group over an axis of length 0).
  """
  axes = group_axes(x.ndim, axis)
  rest = tuple(a for a in range(x.ndim) if a not in axes)
  moved = jnp.transpose(x, rest + axes)
  d = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
  # Both sizes spelled out: reshape(-1, 0) cannot infer the rows of an empty group.
  groups = int(np.prod([x.shape[a] for a in rest], dtype=np.int64))
  rows = moved.reshape(groups, d)
  inverse_perm = tuple(int(i) for i in np.argsort(rest + axes))

  def back(r):
    return jnp.transpose(r.reshape(moved.shape), inverse_perm)

  return rows, back
