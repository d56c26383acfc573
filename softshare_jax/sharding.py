"""Sharding: updates keep the params' sharding, and group-wise work stays where its groups live.

docs/design.md §6. Two tools:

* :func:`like` puts a result back in the layout of the update it replaces.
* :func:`group_local` turns a function that works group by group (the groups
  being the ``axes`` of a leaf, as :mod:`softshare_jax.groups` names them) into
  an op that the SPMD partitioner splits along the other axes: each device
  solves the groups it holds, with no communication, whatever the mesh. Only a
  group that spans devices is gathered, and only along the group axes. The
  layout is read at compile time (``jax.experimental.custom_partitioning``),
  so it works under a plain ``jax.jit`` whose tracers know nothing of it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

try:  # Gone from some JAX releases; without it the partitioner picks the layout.
  from jax.experimental.shard_alike import shard_alike
except ImportError:  # pragma: no cover - depends on the JAX version.
  shard_alike = None

try:
  from jax.experimental.custom_partitioning import custom_partitioning
except ImportError:  # pragma: no cover - depends on the JAX version.
  custom_partitioning = None


def like(u: jax.Array, new: jax.Array) -> jax.Array:
  """``new`` in ``u``'s dtype and sharding.

  A result built by a gather or a transposed view would otherwise let the
  partitioner pick its layout (often replicated), so the update would no
  longer be sharded like the param it updates.

  Example:
    >>> import jax.numpy as jnp
    >>> like(jnp.zeros(3, jnp.bfloat16), jnp.arange(3.0)).dtype
    dtype(bfloat16)
  """
  new = new.astype(u.dtype)
  return new if shard_alike is None else shard_alike(u, new)[1]


def is_single_device(x: Any) -> bool:
  """Whether ``x``'s layout is known, at trace time, to need no communication at all.

  True without a mesh of more than one device, and under an explicit-sharding
  mesh for a leaf that no mesh axis shards. Under a plain ``jax.jit`` with a
  multi-device mesh the layout is only known at compile time: False.

  Example:
    >>> import jax.numpy as jnp
    >>> is_single_device(jnp.zeros(3))
    True
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or mesh.size == 1:
    return True
  explicit = all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  return explicit and all(s is None for s in sharding.spec)


def groups_whole(sharding: Any, ndim: int, axes: tuple[int, ...]) -> Any:
  """``sharding`` with the group ``axes`` unsharded: each device then holds whole groups.

  A layout that is not a ``NamedSharding`` (no mesh to name its axes) becomes
  replicated over its devices, which is always valid.
  """
  if isinstance(sharding, NamedSharding):
    spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
    for a in axes:
      spec[a] = None
    return NamedSharding(sharding.mesh, P(*spec))
  # No mesh axes to name: replicated over the same devices always holds whole groups.
  devices = np.array(sorted(sharding.device_set, key=lambda d: d.id))
  return NamedSharding(jax.sharding.Mesh(devices, ("devices",)), P())


def group_local(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """``fn(x, t, axes, static)``, split by the partitioner along the non-group axes.

  ``fn`` maps a leaf ``x`` (any rank >= 1) to an array of its shape and dtype,
  each group (the ``axes`` of ``x``, a sorted tuple) on its own; ``t`` has the
  shape of ``x`` with the group axes of size 1 (one value per group). ``fn``
  must then be correct on any block of ``x`` that holds whole groups. The
  returned op takes the same arguments (``axes`` and ``static`` hashable),
  runs ``fn`` on each device's own block when the group axes are not sharded,
  and otherwise first gathers ``x`` along the group axes only. It also works
  under ``jax.vmap`` (the vmapped axis is one more non-group axis).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> centre = group_local(lambda x, t, axes, _: x - jnp.mean(x, axis=axes, keepdims=True) * t)
    >>> centre(jnp.array([[1.0, 2.0], [3.0, 6.0]]), jnp.ones((1, 2)), (0,), None)
    Array([[-1., -2.],
           [ 1.,  2.]], dtype=float32)
  """
  if custom_partitioning is None:  # pragma: no cover - depends on the JAX version.
    return fn

  def local(x, t, layout, static):
    return fn(x, t, layout[1], static)

  op = custom_partitioning(local, static_argnums=(2, 3))

  def partition(layout, static, mesh, arg_shapes, result_shape):
    del result_shape
    ndim, axes = layout
    x_sharding = groups_whole(arg_shapes[0].sharding, ndim, axes)
    return mesh, lambda x, t: fn(x, t, axes, static), x_sharding, (x_sharding, x_sharding)

  def infer(layout, static, mesh, arg_shapes, result_shape):
    del static, mesh, result_shape
    ndim, axes = layout
    return groups_whole(arg_shapes[0].sharding, ndim, axes)

  def propagate(layout, static, mesh, user_shape):
    del static, mesh
    ndim, axes = layout
    return groups_whole(user_shape.sharding, ndim, axes)

  def rule(layout, static, mesh, value_types, result_types):
    del static, mesh, value_types, result_types
    ndim, axes = layout
    x = [f"x{a}" for a in range(ndim)]
    # t's group axes have size 1: factors of their own.
    t = [f"g{a}" if a in axes else f"x{a}" for a in range(ndim)]
    need = tuple(f"x{a}" for a in axes)
    spec = f"{' '.join(x)}, {' '.join(t)} -> {' '.join(x)}"
    return spec, ({"need_replication_factors": need} if need else {})

  op.def_partition(partition, infer_sharding_from_operands=infer, propagate_user_sharding=propagate,
                   sharding_rule=rule)

  def call(x, t, axes, static):
    ndim = x.ndim

    @jax.custom_batching.custom_vmap
    def run(x, t):
      return op(x, t, (ndim, tuple(axes)), static)

    @run.def_vmap
    def run_batched(axis_size, in_batched, x, t):
      # The vmapped axis leads: one more axis of independent groups.
      x = x if in_batched[0] else jnp.broadcast_to(x, (axis_size, *x.shape))
      t = t if in_batched[1] else jnp.broadcast_to(t, (axis_size, *t.shape))
      return call(x, t, tuple(a + 1 for a in axes), static), True

    return run(x, t)

  return call
