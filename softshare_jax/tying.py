"""Tying: weight sharing between whole parameter tensors, soft or hard.

A *group* is a sequence of *members*. A member is a path, the leaf's keys
joined by "/" (``"encoder/kernel"``; for Flax NNX the Variable's trailing
``value`` may be left out), or ``transposed(path)`` for a member used
transposed: its axes reversed, ``.T`` (a decoder that uses the encoder's
kernel transposed). Write ``v_m`` for member m's view of its leaf (``w`` or
``w.T``); the views of a group must have one shape.

* :func:`soft_tie` pulls the views towards their mean with the gradient of

      P(w) = λ/2 Σ_m ‖v_m − v̄‖²,   v̄ = 1/n Σ_k v_k,

  i.e. it adds ``λ (v_m − v̄)``, mapped back through the transpose, to each
  member's update. For a pair a, b this is λ/4 ‖a − b‖², a pull of
  ``λ/2 (a − b)`` on a.
* :func:`hard_tie` replaces each member's update by the group's aggregate
  ``Σ_k u_k`` (the gradient of one truly shared parameter) or its mean,
  mapped back through the transpose, so members that start equal
  (:func:`sync`) stay equal under any optimizer placed after it.

A leaf may appear in a group both plain and transposed (a square kernel tied
to its own transpose: a symmetric matrix); it may not appear in two groups.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softshare_jax import checks
from softshare_jax import masks
from softshare_jax.sharding import like

_REDUCTIONS = ("sum", "mean")
_PATHS_SHOWN = 30


@dataclasses.dataclass(frozen=True)
class transposed:  # noqa: N801 - reads like a function call: ss.transposed("dec/kernel").
  """A group member used transposed (its axes reversed, ``.T``).

  Example:
    >>> import softshare_jax as ss
    >>> ss.transposed("decoder/kernel")
    transposed(path='decoder/kernel')
  """

  path: str

  def __post_init__(self):
    if not isinstance(self.path, str) or not self.path:
      raise ValueError(f"transposed: path must be a non-empty string, got {self.path!r}.")


Member = Union[str, transposed]


class _Member(NamedTuple):
  path: str
  t: bool  # Used transposed.

  def __str__(self) -> str:
    return f"transposed({self.path!r})" if self.t else repr(self.path)


# ----------------------------------------------------------------------------
# Groups: parsing, then resolution against a tree at trace time.


def _parse_groups(name: str, groups: Any) -> tuple[tuple[_Member, ...], ...]:
  """Checks what can be checked without a tree; returns the members per group."""
  example = "e.g. [['encoder/kernel', ss.transposed('decoder/kernel')]]"
  if isinstance(groups, (str, transposed)) or not isinstance(groups, Sequence):
    raise ValueError(f"{name}: groups must be a sequence of groups, {example}; got {groups!r}.")
  parsed, owner = [], {}
  for g, group in enumerate(groups):
    if isinstance(group, (str, transposed)):
      raise ValueError(
          f"{name}: groups must be a sequence of groups, each a sequence of members, "
          f"{example}; got the member {group!r} at the top level (wrap the group in a list)."
      )
    if not isinstance(group, Sequence):
      raise ValueError(f"{name}: group {g} must be a sequence of members, got {group!r}.")
    members = []
    for member in group:
      if isinstance(member, transposed):
        m = _Member(member.path, True)
      elif isinstance(member, str) and member:
        m = _Member(member, False)
      else:
        raise ValueError(
            f"{name}: a member must be a non-empty path string or ss.transposed(path), "
            f"got {member!r} in group {g}."
        )
      if m in members:
        raise ValueError(f"{name}: member {m} appears twice in group {g}.")
      if owner.get(m.path, g) != g:
        raise ValueError(
            f"{name}: the leaf at path {m.path!r} is in two groups ({owner[m.path]} and {g}); "
            "merge them into one group."
        )
      owner[m.path] = g
      members.append(m)
    if len(members) < 2:
      raise ValueError(f"{name}: group {g} has {len(members)} member(s); a group ties at least 2.")
    parsed.append(tuple(members))
  return tuple(parsed)


class _Flat(NamedTuple):
  leaves: list
  treedef: Any
  where: dict  # path string -> flat indices of the leaves it names.
  paths: list  # The paths shown in error messages.


def _flatten(tree: Any) -> _Flat:
  """Leaves (None kept as a leaf) and the paths that name them."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  where: dict[str, list[int]] = {}
  paths = []
  for i, (keys, _) in enumerate(flat):
    path = masks.canonical_path(keys)
    paths.append(path)
    # A member may name an NNX leaf with or without its Variable's "value", whether this
    # tree is an nnx.State (init) or the pure updates nnx.Optimizer passes (update).
    for n in {path, masks.path_str(keys), *(f"{path}/{v}" for v in masks.NNX_VALUE_KEYS)}:
      where.setdefault(n, []).append(i)
  return _Flat([leaf for _, leaf in flat], treedef, where, paths)


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(getattr(leaf, "shape", None) or np.shape(leaf))


def _view_shape(shape: tuple[int, ...], t: bool) -> tuple[int, ...]:
  return shape[::-1] if t else shape


def _resolve(name: str, flat: _Flat, groups, what: str = "leaf") -> list[list[tuple[int, bool]]]:
  """Flat indices and transposition per member; checks paths, dtypes and shapes."""
  out = []
  for g, group in enumerate(groups):
    resolved, views = [], []
    for m in group:
      hits = flat.where.get(m.path, [])
      if not hits:
        shown = ", ".join(repr(p) for p in flat.paths[:_PATHS_SHOWN])
        more = f", ... ({len(flat.paths) - _PATHS_SHOWN} more)" if len(flat.paths) > _PATHS_SHOWN else ""
        raise ValueError(f"{name}: no {what} at path {m.path!r}; paths are: {shown or '(none)'}{more}.")
      if len(hits) > 1:
        raise ValueError(f"{name}: path {m.path!r} is ambiguous, it names {len(hits)} leaves.")
      i = hits[0]
      leaf = flat.leaves[i]
      if leaf is not None:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
          raise ValueError(
              f"{name}: the {what} at path {m.path!r} must be a floating-point array, "
              f"got {type(leaf).__name__} of dtype {dtype}."
          )
        views.append((m, _shape(leaf)))
      resolved.append((i, m.t))
    if len({_view_shape(s, m.t) for m, s in views}) > 1:
      described = ", ".join(
          f"{m} {s}" + (f" -> {_view_shape(s, True)}" if m.t else "") for m, s in views
      )
      raise ValueError(
          f"{name}: members of group {g} have incompatible shapes: {described}; "
          "the members' (transposed where asked) shapes must be equal."
      )
    out.append(resolved)
  return out


def _orient(x: jax.Array, t: bool) -> jax.Array:
  return jnp.transpose(x) if t else x


def _symmetric(group: Sequence[tuple[int, bool]]) -> bool:
  """Whether a leaf appears in the group both plain and transposed."""
  return len({i for i, _ in group}) < len(group)


def _compute_dtype(leaves: Sequence[Any]) -> Any:
  return functools.reduce(jnp.promote_types, [leaf.dtype for leaf in leaves], jnp.dtype(jnp.float32))


# ----------------------------------------------------------------------------
# soft_tie.


class SoftTieState(NamedTuple):
  """State of :func:`soft_tie`: the step count, for a ``strength`` schedule."""

  count: jax.Array


def soft_tie(groups: Sequence[Sequence[Member]], strength: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
  """Soft tying: a penalty that pulls the members of each group together.

  Adds the gradient of ``P(w) = λ/2 Σ_m ‖v_m − v̄‖²`` (``v_m`` a member's view
  of its leaf, ``w`` or ``w.T``; ``v̄`` the group's mean view) to the updates:

      u_m ← u_m + λ (v_m − v̄)        (mapped back through the transpose)

  For a pair a, b the penalty is ``λ/4 ‖a − b‖²``. A leaf tied to its own
  transpose gets the sum of both pulls, ``λ (w − w.T)``, which is again the
  gradient of P. ``λ = 0`` is the identity; a large λ drives the members
  together (towards :func:`hard_tie`).

  Placement: like ``optax.add_decayed_weights``, it adds a gradient term, so
  it goes BEFORE the optimizer: ``optax.chain(ss.soft_tie(...), optax.adam(1e-3))``.

  Args:
    groups: a sequence of groups; a group is a sequence of at least two
      members, each a path string (keys joined by "/") or ``ss.transposed(path)``.
      A leaf belongs to at most one group.
    strength: λ >= 0, a float or an optax schedule of the step count.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.
    A member whose update is None stays None (its weights still count in the
    mean). Leaves in no group pass through.

  Raises:
    ValueError: at ``init``/``update`` (trace time), for a path that names no
      leaf, members of incompatible shapes or a non-float leaf; at
      construction, for a malformed group or a leaf in two groups.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import softshare_jax as ss
    >>> params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0, 2.0])}
    >>> tx = ss.soft_tie([["a", "b"]], strength=0.5)
    >>> grads = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates["a"]  # 0.5 * (a - (a + b) / 2)
    Array([-0.5,  0. ], dtype=float32)
  """
  parsed = _parse_groups("soft_tie", groups)
  checks.check_nonnegative("strength", strength)

  def init_fn(params):
    _resolve("soft_tie", _flatten(params), parsed)
    return SoftTieState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    checks.require_params("soft_tie", params)
    lam = checks.check_schedule_value("strength", checks.value_at(strength, state.count))
    u_flat, p_flat = _flatten(updates), _flatten(params)
    p_groups = _resolve("soft_tie", p_flat, parsed)
    u_groups = _resolve("soft_tie", u_flat, parsed, what="update")
    new = list(u_flat.leaves)
    for p_group, u_group in zip(p_groups, u_groups):
      ws = [p_flat.leaves[i] for i, _ in p_group]
      dtype = _compute_dtype(ws)
      views = [_orient(w.astype(dtype), t) for w, (_, t) in zip(ws, p_group)]
      mean = sum(views[1:], views[0]) / len(views)
      pulls: dict[int, jax.Array] = {}
      for view, (j, t) in zip(views, u_group):
        if u_flat.leaves[j] is None:
          continue
        pull = _orient(view - mean, t)
        pulls[j] = pull if j not in pulls else pulls[j] + pull
      for j, pull in pulls.items():
        u = u_flat.leaves[j]
        new[j] = like(u, u.astype(dtype) + lam * pull)
    updates = jax.tree_util.tree_unflatten(u_flat.treedef, new)
    return updates, SoftTieState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------
# hard_tie.


class HardTieState(NamedTuple):
  """State of :func:`hard_tie`: none (the tie is stateless)."""


def hard_tie(groups: Sequence[Sequence[Member]], *, reduce: str = "sum") -> optax.GradientTransformationExtraArgs:
  """Hard tying: every member of a group gets the group's aggregated update.

      u_m ← A,   A = Σ_k u_k  ("sum")  or  1/n Σ_k u_k  ("mean")

  with each ``u_k`` taken in its member's view (transposed for
  ``ss.transposed(path)``) and ``A`` mapped back through the transpose. With
  ``"sum"``, ``A`` is the gradient of one truly shared parameter (a tied
  autoencoder, tied input/output embeddings). Members that start equal (see
  :func:`sync`) stay equal. When a leaf appears in a group both plain and
  transposed (its members are symmetric), ``A`` is symmetrized,
  ``A ← (A + A.T)/2``: the gradient of a shared symmetric parameter.

  Placement: BEFORE the optimizer, so that the optimizer (Adam's moments
  included) sees identical gradients for the tied members and keeps them equal:
  ``optax.chain(ss.hard_tie(...), optax.adam(1e-3))``. Any optimizer that
  treats each element alike (SGD, momentum, Adam, weight decay of equal
  weights) preserves the tie; one that mixes elements across a leaf by their
  position (e.g. per-row normalization of a transposed member) need not.

  Args:
    groups: a sequence of groups; a group is a sequence of at least two
      members, each a path string (keys joined by "/") or ``ss.transposed(path)``.
      A leaf belongs to at most one group.
    reduce: ``"sum"`` (default) or ``"mean"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` does not need
    ``params``. A member whose update is None stays None and does not count
    in the aggregate. Leaves in no group pass through.

  Raises:
    ValueError: at construction, for a malformed group or a leaf in two
      groups; at ``init``, for a path that names no leaf, members of
      incompatible shapes or a non-float leaf, and for members that do not
      start equal: every member's view must equal the first member's view
      (cast to the member's dtype) exactly, as :func:`sync` leaves them (a
      leaf tied to its own transpose must be symmetric). The message names
      the group and the first member that differs. Unequal members would
      keep their difference for ever under any elementwise optimizer. The
      check is skipped where the values are unknown (``init`` under ``jit``
      or ``jax.eval_shape``, ``jax.ShapeDtypeStruct`` leaves).

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> groups = [["enc", ss.transposed("dec")]]
    >>> params = ss.sync({"enc": jnp.array([[0.5, -1.0]]), "dec": jnp.zeros((2, 1))}, groups)
    >>> tx = ss.hard_tie(groups)
    >>> state = tx.init(params)   # unsynced members: a ValueError that says to call ss.sync
    >>> grads = {"enc": jnp.array([[1.0, 2.0]]), "dec": jnp.array([[10.0], [20.0]])}
    >>> updates, _ = tx.update(grads, state)
    >>> updates["enc"], updates["dec"]
    (Array([[11., 22.]], dtype=float32), Array([[11.], [22.]], dtype=float32))
  """
  parsed = _parse_groups("hard_tie", groups)
  checks.check_choice("hard_tie: reduce", reduce, _REDUCTIONS)

  def init_fn(params):
    flat = _flatten(params)
    _check_equal_start(flat, _resolve("hard_tie", flat, parsed), parsed)
    return HardTieState()

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    flat = _flatten(updates)
    new = list(flat.leaves)
    for group in _resolve("hard_tie", flat, parsed, what="update"):
      live = [(j, t) for j, t in group if flat.leaves[j] is not None]
      if not live:
        continue
      dtype = _compute_dtype([flat.leaves[j] for j, _ in live])
      views = [_orient(flat.leaves[j].astype(dtype), t) for j, t in live]
      agg = sum(views[1:], views[0])
      if reduce == "mean":
        agg = agg / len(views)
      if _symmetric(group):
        agg = (agg + jnp.transpose(agg)) / 2
      plain = {}  # Once per leaf; a symmetric agg is the same either way.
      for j, t in live:
        plain[j] = plain.get(j, False) or not t
      for j, is_plain in plain.items():
        new[j] = like(flat.leaves[j], _orient(agg, not is_plain))
    return jax.tree_util.tree_unflatten(flat.treedef, new), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_concrete(leaf: Any) -> bool:
  """Whether a leaf's values can be read now (not a tracer, not a ``ShapeDtypeStruct``)."""
  return not isinstance(leaf, (jax.core.Tracer, jax.ShapeDtypeStruct)) and hasattr(leaf, "dtype")


def _check_equal_start(flat: _Flat, resolved, groups) -> None:
  """Raises unless every member's view equals its group's first member's view.

  :func:`hard_tie` gives the members equal updates, so they stay equal only
  if they start equal; unequal ones would train apart silently (their
  difference never changes). Compared exactly, as :func:`sync` leaves them:
  the first member's view cast to the other member's dtype (a leaf tied to
  its own transpose must be symmetric). None leaves are left out; a group
  with a tracer or ``ShapeDtypeStruct`` leaf is skipped (its values are
  unknown).
  """
  for g, (group, members) in enumerate(zip(resolved, groups)):
    present = [(flat.leaves[i], t, m) for (i, t), m in zip(group, members) if flat.leaves[i] is not None]
    if len(present) < 2 or not all(_is_concrete(leaf) for leaf, _, _ in present):
      continue
    # NumPy leaves are compared in NumPy: jnp would round float64 to float32 first.
    xp = jnp if any(isinstance(leaf, jax.Array) for leaf, _, _ in present) else np
    views = [xp.transpose(xp.asarray(leaf)) if t else xp.asarray(leaf) for leaf, t, _ in present]
    members = [m for _, _, m in present]
    for view, member in zip(views[1:], members[1:]):
      ref = views[0].astype(view.dtype)
      same = (view == ref) | (xp.isnan(view) & xp.isnan(ref))
      if bool(xp.all(same)):
        continue
      wide = np.float64 if xp is np else jnp.float32
      diff = xp.abs(view.astype(wide) - ref.astype(wide))
      raise ValueError(
          f"hard_tie: the members of group {g} do not start equal: {member} differs from {members[0]} "
          f"at {int(xp.sum(~same))} of {view.size} entries (largest difference {float(xp.nanmax(diff)):.3g}). "
          "hard_tie gives the members equal updates, so members that start apart stay apart; "
          "call params = ss.sync(params, groups) before tx.init(params)."
      )


# ----------------------------------------------------------------------------
# sync.


def sync(params: Any, groups: Sequence[Sequence[Member]]) -> Any:
  """Copies each group's first member into the others (for a hard tie's start).

  Member m becomes the first member's view mapped back through m's
  transpose, in m's dtype. When a leaf appears in a group both plain and
  transposed, the copied view is first symmetrized, ``(v + v.T)/2``. Works on
  plain dicts, Flax Linen param dicts and ``nnx.State`` (NNX paths may leave
  out the Variable's trailing ``value``); returns a new tree.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> params = {"enc": jnp.array([[1.0, 2.0]]), "dec": jnp.zeros((2, 1))}
    >>> ss.sync(params, [["enc", ss.transposed("dec")]])["dec"]
    Array([[1.], [2.]], dtype=float32)
  """
  parsed = _parse_groups("sync", groups)
  flat = _flatten(params)
  new = list(flat.leaves)
  for group in _resolve("sync", flat, parsed):
    first, t0 = group[0]
    view = _orient(jnp.asarray(flat.leaves[first]), t0)
    rest = group[1:]
    if _symmetric(group):
      dtype = _compute_dtype([view])
      view = (view.astype(dtype) + jnp.transpose(view).astype(dtype)) / 2
      rest = group
    for j, t in rest:
      new[j] = _orient(view, t).astype(flat.leaves[j].dtype)
  return jax.tree_util.tree_unflatten(flat.treedef, new)
