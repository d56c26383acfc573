"""Keeping an update's sharding equal to the params' (docs/design.md §6)."""

from __future__ import annotations

import jax

try:  # Gone from some JAX releases; without it the partitioner picks the layout.
  from jax.experimental.shard_alike import shard_alike
except ImportError:  # pragma: no cover - depends on the JAX version.
  shard_alike = None


def like(u: jax.Array, new: jax.Array) -> jax.Array:
  """``new`` in ``u``'s dtype and sharding.

  A result built by a gather or a transposed view would otherwise let the
  partitioner pick its layout (often replicated), so the update would no
  longer be sharded like the param it updates.
  """
  new = new.astype(u.dtype)
  return new if shard_alike is None else shard_alike(u, new)[1]
