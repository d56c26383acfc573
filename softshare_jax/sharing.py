"""Weight-sharing regularization (Shakerinava et al. 2024) and its exact prox.

    R(w) = 1/(d−1) Σ_{i>j} |w_i − w_j|

pulls every pair of weights in a group together; its proximal map merges
weights into clusters of exactly equal values, which is weight sharing that the
network discovers by itself (docs/design.md §4.2). The isotonic kernels that
solve the prox live in :mod:`softshare_jax.isotonic`; the Optax transform that
applies it after an optimizer step in :mod:`softshare_jax.sharing_prox`.
"""

from __future__ import annotations

import ctypes
import functools
import json
import traceback
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from softshare_jax import checks
from softshare_jax import isotonic
from softshare_jax import sharding
from softshare_jax.groups import Axis
from softshare_jax.groups import group_axes
from softshare_jax.groups import to_rows

METHODS = ("auto", "device", "host")


def check_float(x: jax.Array) -> None:
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(
        f"x must be a floating-point array, got dtype {jnp.result_type(x)}; "
        "cast it first, e.g. x.astype(jnp.float32)."
    )


def compute_dtype(dtype) -> np.dtype:
  """The dtype the prox computes in: float32 for float32 and narrower, float64 for float64."""
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


def _scalar(name: str, value, dtype) -> jax.Array:
  """``value`` as a scalar of ``dtype``; a concrete value beyond its range is clamped.

  Clamping is exact: any strength above the spread of a group already gives
  the group mean, and any l1 above the largest weight already gives zeros.
  """
  if not checks.is_traced(value):
    value = np.minimum(np.asarray(value, np.float64), np.finfo(dtype).max)
  v = jnp.asarray(value).astype(dtype)
  if v.ndim:
    raise ValueError(f"{name} must be a scalar, got {value!r} (shape {v.shape}).")
  return v


# ----------------------------------------------------------------------------
# The penalty.


def weight_sharing_penalty(x: jax.Array, axis: Axis = None) -> jax.Array:
  """R(x) = 1/(d−1) Σ_{i>j} |x_i − x_j|, summed over the groups of ``x``.

  With ``z`` the group sorted ascending (1-indexed), R = 1/(d−1) Σ_k (2k − d − 1) z_k:
  one sort and a weighted sum, O(d log d). Differentiable with ``jax.grad``.
  Groups of one weight contribute 0.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> float(ss.weight_sharing_penalty(jnp.array([0.0, 1.0, 3.0])))  # (1 + 3 + 2) / 2
    3.0
  """
  x = jnp.asarray(x)
  check_float(x)
  rows, _ = to_rows(x, axis)
  d = rows.shape[-1]
  if d < 2 or rows.size == 0:
    return jnp.zeros((), jnp.result_type(x, jnp.float32))
  z = jnp.sort(rows.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=-1)
  ramp = jnp.arange(1 - d, d, 2, dtype=z.dtype)
  return jnp.sum(z @ ramp) / (d - 1)


# ----------------------------------------------------------------------------
# The host kernel as a custom call.
#
# jax.pure_callback has bulk-array semantics outside shard_map: one call, on
# device 0, for a whole sharded leaf (the partitioner gathers it there and
# scatters the result back). Inside a custom-partitioned op a callback is worse:
# JAX drops its registration with the partitioner's sub-module. A plain CPU
# custom call has neither problem: XLA runs it on each device's own block. Its
# target is a ctypes trampoline into isotonic.prox_rows_host; the layout of the
# block travels in the call's opaque string.

HOST_TARGET = "softshare_jax_prox_rows_host"

_TRAMPOLINE = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p)
_KEEPALIVE: list = []  # the trampoline must outlive every executable that calls it


def host_segments(x: np.ndarray, t: np.ndarray, segments: Sequence[tuple[int, int]]) -> np.ndarray:
  """The prox of ``t · R`` on rows laid out back to back in a flat ``x``.

  ``segments`` lists ``(n, d)``: n rows of length d, then the next block; ``t``
  holds one value per row. Each block is one call of
  :func:`isotonic.prox_rows_host`, so rows of different lengths share one trip
  to the host.

  Example:
    >>> import numpy as np
    >>> host_segments(np.array([0.0, 0.05, 1.0, 3.0, 3.0]), np.array([0.1, 1.0]), [(1, 3), (1, 2)])
    array([0.075, 0.075, 0.9  , 3.   , 3.   ])
  """
  x, t = np.asarray(x), np.asarray(t)
  out = np.empty_like(x)
  merged: list = []
  for n, d in segments:  # neighbours of one length are one block: one call
    if merged and merged[-1][1] == d:
      merged[-1][0] += n
    else:
      merged.append([n, d])
  at = row = 0
  for n, d in merged:
    block = x[at:at + n * d].reshape(n, d)
    out[at:at + n * d] = isotonic.prox_rows_host(block, t[row:row + n]).reshape(-1)
    at, row = at + n * d, row + n
  return out


@functools.lru_cache(maxsize=1024)
def _layout(opaque: bytes) -> tuple[np.dtype, tuple[tuple[int, int], ...]]:
  spec = json.loads(opaque)
  return np.dtype(spec["dtype"]), tuple((int(n), int(d)) for n, d in spec["segments"])


def _trampoline(out, ins, opaque, size, status) -> None:
  del status
  try:
    dtype, segments = _layout(ctypes.string_at(opaque, size))
    ctype = ctypes.POINTER(ctypes.c_double if dtype == np.float64 else ctypes.c_float)
    total, rows = sum(n * d for n, d in segments), sum(n for n, _ in segments)
    view = lambda ptr, k: np.ctypeslib.as_array(ctypes.cast(ptr, ctype), (k,))  # noqa: E731
    result = view(out, total)
    result[:] = np.nan  # what an exception leaves: loud, never a silent wrong value
    result[:] = host_segments(view(ins[0], total), view(ins[1], rows), segments)
  except BaseException:  # nothing may unwind into XLA
    traceback.print_exc()


@functools.cache
def host_custom_call() -> bool:
  """Registers the host kernel as a CPU custom call once; False where JAX refuses it."""
  try:
    fn = _TRAMPOLINE(_trampoline)
    jax.ffi.register_ffi_target(HOST_TARGET, jax.ffi.pycapsule(fn), platform="cpu", api_version=0)
  except Exception:  # pragma: no cover - depends on the JAX version.
    return False
  _KEEPALIVE.append(fn)
  return True


def _host_call(x: jax.Array, t: jax.Array, segments: tuple, kind: str) -> jax.Array:
  """:func:`host_segments` on a flat ``x``: as a CPU custom call ("host") or a pure_callback."""
  out = jax.ShapeDtypeStruct(x.shape, x.dtype)
  if kind == "host" and host_custom_call():
    opaque = json.dumps({"dtype": np.dtype(x.dtype).name, "segments": segments})
    return jax.ffi.ffi_call(HOST_TARGET, out, custom_call_api_version=3, legacy_backend_config=opaque,
                            vmap_method="sequential")(x, t)
  host = functools.partial(host_segments, segments=segments)
  return jax.pure_callback(host, out, x, t, vmap_method="sequential")


# ----------------------------------------------------------------------------
# The fit of every group: one leaf where it lives, or many leaves at once.


def _group_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(1 if a in axes else n for a, n in enumerate(shape))


# The device kernel's scratch is several times its input, so a block of many
# rows goes through it a chunk of rows at a time (docs/design.md §6). On CPU,
# 512 KiB per chunk (2^17 float32). Accelerators want wide chunks for
# parallelism: up to 64 MiB, but at most a sixteenth of the block.
CHUNK_BYTES = {"cpu": 2**19, "other": 2**26}
CHUNK_FRACTION = 16


def chunk_rows(rows: int, d: int, itemsize: int, platform: str) -> int:
  """Rows of length ``d`` per device-kernel call on ``platform`` (``"cpu"`` or ``"other"``), at least one.

  Example:
    >>> chunk_rows(4096, 1024, 4, "cpu"), chunk_rows(4096, 1024, 4, "other"), chunk_rows(3, 2**20, 4, "cpu")
    (128, 256, 1)
  """
  if platform not in CHUNK_BYTES:
    raise ValueError(f"platform must be one of {tuple(CHUNK_BYTES)}, got {platform!r}.")
  row = max(d, 1) * itemsize
  budget = min(CHUNK_BYTES[platform], max(CHUNK_BYTES["cpu"], rows * row // CHUNK_FRACTION))
  return int(min(rows, max(1, budget // row)))


def prox_rows_chunked(x: jax.Array, t: jax.Array, chunk: int) -> jax.Array:
  """:func:`isotonic.prox_rows_device` on ``(rows, d)`` ``x``, ``chunk`` rows per kernel call.

  The kernel is row by row, so the result is the one call's, bit for bit,
  with the scratch of ``chunk`` rows. The chunks overwrite ``x`` in place
  (a loop carry, not a second output array); when ``chunk`` does not divide
  the rows, the last chunk ends at the last row and overlaps the one before
  it, whose rows, already solved, go through it with step 0 (the kernel
  returns such a row bit for bit).

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.0, 0.05, 1.0], [3.0, 2.0, 2.01], [1.0, 0.0, 0.5]])
    >>> prox_rows_chunked(x, jnp.full(3, 0.1), chunk=2)
    Array([[0.075, 0.075, 0.9  ],
           [2.9  , 2.055, 2.055],
           [0.9  , 0.1  , 0.5  ]], dtype=float32)
  """
  rows = x.shape[0]
  t = jnp.broadcast_to(jnp.asarray(t).astype(x.dtype), (rows,))
  if chunk >= rows:
    return isotonic.prox_rows_device(x, t)
  if chunk < 1:
    raise ValueError(f"chunk must be at least 1, got {chunk!r}.")

  def body(i, out):
    start = jnp.minimum(i * chunk, rows - chunk)
    fresh = lax.broadcasted_iota(jnp.int32, (chunk,), 0) + start >= i * chunk
    step = jnp.where(fresh, lax.dynamic_slice_in_dim(t, start, chunk), 0)
    block = lax.dynamic_slice_in_dim(out, start, chunk)
    # In a conditional that always runs: XLA hoists what the kernel computes
    # from its shape alone (iotas and what follows from them) out of a loop,
    # as arrays alive through all of it; it does not hoist out of a branch.
    fit = lax.cond(i >= 0, isotonic.prox_rows_device, lambda x, _: x, block, step)
    return lax.dynamic_update_slice_in_dim(out, fit, start, 0)

  return lax.fori_loop(0, -(-rows // chunk), body, x)


def _prox_rows_on(platform: str, x: jax.Array, t: jax.Array) -> jax.Array:
  return prox_rows_chunked(x, t, chunk_rows(*x.shape, x.dtype.itemsize, platform))


def _fit_block(x: jax.Array, t: jax.Array, axes: tuple[int, ...], kind: str) -> jax.Array:
  """The fit on a block of whole groups; ``t`` has one value per group (group axes of size 1).

  ``kind``: ``"host"``, ``"callback"``, or ``"device:<platform>"`` (chunked for that platform).
  """
  rows, back = to_rows(x, axes)
  t_rows = to_rows(t, axes)[0][:, 0]
  if kind.startswith("device:"):
    return back(_prox_rows_on(kind.split(":")[1], rows, t_rows))
  return back(_host_call(rows.reshape(-1), t_rows, (rows.shape,), kind).reshape(rows.shape))


# Split by the partitioner along the non-group axes: each device fits its own groups.
_fit_local = sharding.group_local(_fit_block)


def _fit_leaf(x: jax.Array, t: jax.Array, axes: tuple[int, ...], method: str) -> jax.Array:
  t = jnp.broadcast_to(t, _group_shape(x.shape, axes))
  device = functools.partial(_fit_local, axes=axes, static="device:other")
  # A callback cannot run inside the partitioned op: without the custom call it stays whole.
  cpu = (functools.partial(_fit_local, axes=axes, static="host") if host_custom_call()
         else functools.partial(_fit_block, axes=axes, kind="callback"))
  if method == "device":
    return lax.platform_dependent(x, t, cpu=functools.partial(_fit_local, axes=axes, static="device:cpu"),
                                  default=device)
  if method == "host":
    return lax.platform_dependent(x, t, cpu=cpu, default=functools.partial(_fit_block, axes=axes, kind="callback"))
  return lax.platform_dependent(x, t, cpu=cpu, default=device)


def _fit_batch(xs: tuple, t: jax.Array, layouts: tuple, method: str) -> tuple:
  """The fit of several leaves that need no communication: one host call, or one kernel per row length."""
  rows = [to_rows(x, axes) for x, axes in zip(xs, layouts)]

  def host(kind, t, *rs):
    order = sorted(range(len(rs)), key=lambda i: rs[i].shape[1])  # rows of one length side by side
    segments = tuple(rs[i].shape for i in order)
    t_rows = jnp.broadcast_to(t, (sum(n for n, _ in segments),))
    flat = _host_call(jnp.concatenate([rs[i].reshape(-1) for i in order]), t_rows, segments, kind)
    cuts = np.cumsum([rs[i].size for i in order])[:-1]
    out = [None] * len(rs)
    for i, f in zip(order, jnp.split(flat, cuts)):
      out[i] = f.reshape(rs[i].shape)
    return tuple(out)

  def device(platform, t, *rs):
    # The prox is not padding-invariant: rows of one length per kernel (chunked) loop.
    out = [None] * len(rs)
    for d in sorted({r.shape[1] for r in rs}):
      which = [i for i, r in enumerate(rs) if r.shape[1] == d]
      block = jnp.concatenate([rs[i] for i in which])
      fit = _prox_rows_on(platform, block, jnp.broadcast_to(t, block.shape[:1]))
      cuts = np.cumsum([rs[i].shape[0] for i in which])[:-1]
      for i, f in zip(which, jnp.split(fit, cuts)):
        out[i] = f
    return tuple(out)

  cpu = functools.partial(host, "host")
  other = functools.partial(device, "other")
  rs = [r for r, _ in rows]
  if method == "device":
    fits = lax.platform_dependent(t, *rs, cpu=functools.partial(device, "cpu"), default=other)
  elif method == "host":
    fits = lax.platform_dependent(t, *rs, cpu=cpu, default=functools.partial(host, "callback"))
  else:
    fits = lax.platform_dependent(t, *rs, cpu=cpu, default=other)
  return tuple(back(f) for f, (_, back) in zip(fits, rows))


# Jitted once per shape and layout: eager calls neither re-trace nor run op by op.
_fit_leaf_jit = jax.jit(_fit_leaf, static_argnums=(2, 3))
_fit_batch_jit = jax.jit(_fit_batch, static_argnums=(2, 3))


def _fit_leaves(xs: tuple, t: jax.Array, layouts: tuple, method: str) -> tuple:
  if len(xs) == 1:
    return (_fit_leaf_jit(xs[0], t, layouts[0], method),)
  return _fit_batch_jit(xs, t, layouts, method)


def _soft_threshold(y: jax.Array, s: jax.Array) -> jax.Array:
  # A NaN or negative l1 (possible only traced) has no prox: NaN, not a push outwards.
  return jnp.where(s >= 0, jnp.sign(y) * jnp.maximum(jnp.abs(y) - s, 0.0), jnp.nan)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _prox_leaves(xs, t, s, layouts, method):
  return tuple(_soft_threshold(y, s) for y in _fit_leaves(xs, t, layouts, method))


def _fit_tangent(y: jax.Array, dx: jax.Array, dt: jax.Array) -> jax.Array:
  """The tangent of the fit ``y`` (rows) for input tangents ``dx`` and ``dt``."""
  rows, d = y.shape
  # The clusters are the runs of equal values of y in sorted order. Inside a
  # cluster [i, j) the fit is mean(z) − a·(i + j − d), so its tangent is the
  # mean input tangent minus da·(i + j − d).
  k = lax.broadcasted_iota(jnp.int32, y.shape, 1)
  ys, perm = lax.sort((y, k), dimension=1, num_keys=1)
  new = jnp.concatenate([jnp.ones((rows, 1), bool), ys[:, 1:] != ys[:, :-1]], axis=1)
  ids = (jnp.cumsum(new, axis=1) - 1 + lax.broadcasted_iota(jnp.int32, y.shape, 0) * d).ravel()
  n_seg = rows * d
  count = jax.ops.segment_sum(jnp.ones(n_seg, y.dtype), ids, n_seg)[ids]
  start = jax.ops.segment_min(k.ravel(), ids, n_seg)[ids]
  dz = jnp.take_along_axis(dx, perm, axis=1).ravel()
  mean_dz = jax.ops.segment_sum(dz, ids, n_seg)[ids] / count
  ramp = (2 * start + count - d).astype(y.dtype) / max(d - 1, 1)
  dys = (mean_dz - dt * ramp).reshape(y.shape)
  return jnp.zeros_like(dys).at[lax.broadcasted_iota(jnp.int32, y.shape, 0), perm].set(dys, unique_indices=True)


@_prox_leaves.defjvp
def _prox_leaves_jvp(layouts, method, primals, tangents):
  xs, t, s = primals
  dxs, dt, ds = tangents
  outs, douts = [], []
  for y, dx, axes in zip(_fit_leaves(xs, t, layouts, method), dxs, layouts):
    y_rows, back = to_rows(y, axes)
    dy = back(_fit_tangent(y_rows, to_rows(dx, axes)[0], dt))
    outs.append(_soft_threshold(y, s))
    douts.append(jnp.where(jnp.abs(y) > s, dy - jnp.sign(y) * ds, 0.0))
  return tuple(outs), tuple(douts)


def prox_layout(x: jax.Array, axis: Axis) -> tuple[int, ...]:
  """Checks that the prox takes ``x`` with ``axis``; returns its group axes.

  Example:
    >>> import jax.numpy as jnp
    >>> prox_layout(jnp.zeros((2, 3)), -1)
    (1,)
  """
  check_float(x)
  return group_axes(np.ndim(x), axis)


def prox_many(
    xs: Sequence[jax.Array],
    strength: float | jax.Array,
    *,
    l1: float | jax.Array = 0.0,
    axis: Axis = None,
    method: str = "auto",
) -> list[jax.Array]:
  """:func:`prox_weight_sharing` of every array of ``xs``, in as few kernel calls as layouts allow.

  Arrays whose layout is known to need no communication (no multi-device
  mesh, or unsharded under an explicit-sharding mesh) share one host call, or
  one device kernel per group length and compute dtype. Every other array is
  solved where it lives: each device fits the groups it holds (a group that
  spans devices is gathered along its own axes only). The results equal
  :func:`prox_weight_sharing` on each array, bit for bit.

  Example:
    >>> import jax.numpy as jnp
    >>> a, b = prox_many([jnp.array([0.0, 0.05, 1.0]), jnp.array([[1.0, 2.0]])], 0.1)
    >>> a
    Array([0.075, 0.075, 0.9  ], dtype=float32)
  """
  checks.check_nonnegative("strength", strength)
  checks.check_nonnegative("l1", l1)
  checks.check_choice("method", method, METHODS)
  xs = [jnp.asarray(x) for x in xs]
  out: list = [None] * len(xs)
  batches: dict = {}
  for i, x in enumerate(xs):
    axes = prox_layout(x, axis)
    dtype = compute_dtype(x.dtype)
    t = _scalar("strength", strength, dtype)
    s = _scalar("l1", l1, dtype)
    if x.size == 0:
      out[i] = x
    elif all(x.shape[a] == 1 for a in axes):  # groups of one weight: only the l1 step
      out[i] = _soft_threshold(jnp.where(t >= 0, x.astype(dtype), jnp.nan), s).astype(x.dtype)
    else:
      key = (dtype, i) if not sharding.is_single_device(x) else (dtype, -1)
      batches.setdefault(key, []).append((i, axes))
  for (dtype, _), members in batches.items():
    t = _scalar("strength", strength, dtype)
    s = _scalar("l1", l1, dtype)
    ys = _prox_leaves(tuple(xs[i].astype(dtype) for i, _ in members), t, s,
                      tuple(axes for _, axes in members), method)
    for (i, _), y in zip(members, ys):
      out[i] = y.astype(xs[i].dtype)
  return out


def prox_weight_sharing(
    x: jax.Array,
    strength: float | jax.Array,
    *,
    l1: float | jax.Array = 0.0,
    axis: Axis = None,
    method: str = "auto",
) -> jax.Array:
  """Exact proximal map of ``strength · R + l1 · ‖·‖₁`` on every group of ``x``.

      prox(y) = argmin_w ½‖w − y‖² + strength · R(w) + l1 · ‖w‖₁

  The prox keeps the order of ``y``: sort (z = sorted y), fit a non-decreasing
  sequence to ``z − a(2k − d − 1)`` with ``a = strength/(d − 1)``, undo the
  sort, then soft-threshold by ``l1``. Weights whose fitted values meet form a
  cluster of exactly equal values. Each weight moves by at most ``strength``
  (before the l1 step); a strength of at least the group's spread
  (max − min) gives the group mean exactly, however large (so do strengths
  beyond the float range); strength 0 returns ``x`` bit for bit.

  Groups are independent: a group holding a NaN or an infinity comes back all
  NaN (the prox of a non-finite point is undefined) and leaves the other groups
  alone; a group of one weight has R = 0 and only gets the l1 step. A NaN or
  negative strength or l1, possible only when traced, gives NaN. An empty ``x``
  comes back as it is.

  Args:
    x: a floating-point array; bf16/f16 are computed in float32, float64 (under
      ``jax_enable_x64``) in float64, and returned in their own dtype.
    strength: t >= 0, the weight of R.
    l1: s >= 0, the weight of the ℓ1 term.
    axis: the axes that form one group (None: the whole array; ``()``: every
      weight its own group). A scalar ``x`` takes only None or ``()``.
    method: ``"device"`` (pure JAX: sort, parallel pooling, then a
      bounded-depth merge; any backend), ``"host"`` (the C kernel of
      :mod:`softshare_jax.isotonic_host`, run by XLA on each CPU device's own
      groups; the fastest path on CPU), or ``"auto"`` (host on CPU,
      device elsewhere, chosen per backend at lowering).

  Returns:
    The prox, with the shape and dtype of ``x``. Differentiable: inside a
    cluster the tangent is the mean of the input tangents, and weights zeroed
    by ``l1`` pass no tangent.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> ss.prox_weight_sharing(jnp.array([0.0, 0.05, 1.0]), 0.1)  # 0 and 0.05 merge
    Array([0.075, 0.075, 0.9  ], dtype=float32)
  """
  x = jnp.asarray(x)
  check_float(x)
  checks.check_nonnegative("strength", strength)
  checks.check_nonnegative("l1", l1)
  checks.check_choice("method", method, METHODS)
  return prox_many([x], strength, l1=l1, axis=axis, method=method)[0]
