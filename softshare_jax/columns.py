"""Building blocks that keep XLA from materializing arrays of a row's size.

The device prox kernel (:mod:`softshare_jax.isotonic`) holds its working
memory to a few arrays of its input's size; these helpers are how: index
arrays that XLA cannot hoist out of loops or make ahead of time
(:func:`salted_iota`), gathers computed once per use rather than kept
(:func:`fresh`), and scans along a row that write their output a column at a
time into one buffer (:func:`scan_columns`).

Example:
  >>> import jax.numpy as jnp
  >>> from softshare_jax import columns
  >>> x = jnp.array([[3, 1, 4, 1, 5]], jnp.int32)
  >>> columns.scan_columns(jnp.zeros_like(x), lambda idx, out: jnp.take_along_axis(x, idx, 1, mode="clip"),
  ...                      jnp.maximum, 0, lambda out, idx, before, after: columns.put(out, idx, after))
  Array([[3, 3, 4, 4, 5]], dtype=int32)
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax


def salted_iota(shape: tuple[int, ...], salt: Any) -> jax.Array:
  """Positions along the last axis, through a no-op on ``salt`` (a loop index,
  or a value of the data): XLA would hoist what a plain iota computes inside a
  loop (e.g. gathers at every position) out of it, as arrays, and it makes
  the index arrays of constant gathers (a (row, column) pair per element with
  several rows) ahead of time, as arrays of the row's size or twice it."""
  return jnp.minimum(lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1), shape[-1] + jnp.abs(salt))


def fresh(make: Callable[[int], dict]) -> Callable[[str], Callable[[], jax.Array]]:
  """``name -> (() -> make(salt)[name])``, each call with a salt of its own.

  XLA keeps a gather whose result has several uses as a (rows, d) array; a
  gather computed once per use is fused into its consumer instead. ``make``
  passes the salt (a distinct constant) into a no-op, so that no two uses are
  the same expression.
  """
  salts = itertools.count(1)
  return lambda name: lambda: make(next(salts))[name]


# Scans by columns: position b·128 + j is column j of block b. A scan visits the
# 128 columns in order, each a (rows, d/128) slice, after a first visit that
# totals every block and a scan across the block totals; its output is written
# a column at a time into one buffer, in place. A log-depth scan (lax.cummax)
# keeps a second array of the row's size alive, and several inputs to the
# scan would each be one more: here they are computed per column.
COLUMNS = 128


def column(rows: int, d: int, j: Any) -> jax.Array:
  """Positions of column ``j`` in rows of ``d``: ``(rows, ceil(d / COLUMNS))``, some past the end."""
  return lax.broadcasted_iota(jnp.int32, (rows, -(-d // COLUMNS)), 1) * COLUMNS + j


def put(out: jax.Array, idx: jax.Array, values: jax.Array) -> jax.Array:
  """``out`` with ``values`` at positions ``idx`` of each row; those past the end are dropped."""
  r = lax.broadcasted_iota(jnp.int32, idx.shape, 0)
  return out.at[r, idx].set(values, mode="drop", unique_indices=True, indices_are_sorted=True)


def scan_columns(out: jax.Array, value: Callable, combine: Callable, identity: Any, write: Callable,
                 reverse: bool = False) -> jax.Array:
  """Scans ``value`` along each row of ``out`` and lets ``write`` store it there.

  ``value(idx, out)`` gives the scanned element (a pytree of arrays) at positions
  ``idx`` (positions past the row's end must give ``identity``), ``combine(a,
  b)`` is associative with ``a`` first in the scan's order, and ``write(out,
  idx, before, after)`` returns ``out`` with the column ``idx`` written, from the
  scan just before and just after its elements. ``value`` may read ``out`` at
  ``idx``: a column is read before it is written.
  """
  rows, d = out.shape
  order = (lambda j: COLUMNS - 1 - j) if reverse else (lambda j: j)
  zero = jax.tree.map(lambda v: jnp.full(column(rows, d, 0).shape, v, jnp.int32), identity)

  def total(j, acc):
    return combine(acc, value(column(rows, d, order(j)), out))

  totals = lax.fori_loop(0, COLUMNS, total, zero)
  if reverse:
    totals = jax.tree.map(lambda a: a[:, ::-1], totals)
  # Exclusive scan across blocks (few: d/128 per row).
  incl = lax.associative_scan(combine, totals, axis=1)
  run = jax.tree.map(lambda z, a: jnp.concatenate([z[:, :1], a[:, :-1]], axis=1), zero, incl)
  if reverse:
    run = jax.tree.map(lambda a: a[:, ::-1], run)

  def step(j, carry):
    out, run = carry
    idx = column(rows, d, order(j))
    after = combine(run, value(idx, out))
    return write(out, idx, run, after), after

  return lax.fori_loop(0, COLUMNS, step, (out, run))[0]
