"""Masks: which leaves of a parameter tree a transform acts on.

A mask is what ``optax.masked`` takes: a pytree of bools with the structure of
the params or a prefix of it (a bool then covers a whole subtree; a plain
``True`` covers everything), or a callable ``params -> such a pytree``.

Key paths: a leaf's canonical path (:func:`canonical_path`) is its keys' names
joined by "/", less the trailing ``value`` of a Flax NNX Variable.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

Mask = Union[Any, Callable[[Any], Any]]


def _as_bool(path: tuple, m: Any) -> bool:
  """A mask leaf as a Python bool; anything but a bool scalar is an error (``"False"`` is truthy)."""
  if isinstance(m, (bool, np.bool_)):
    return bool(m)
  ok = (getattr(m, "dtype", None) == np.bool_ and np.shape(m) == ()
        and not isinstance(m, jax.core.Tracer))
  if not ok:
    where = f" at {path_str(path)!r}" if path else ""
    raise ValueError(f"mask must hold bools (Python, NumPy or concrete JAX bool scalars), got {m!r}{where}; "
                     "a mask leaf covers the whole params subtree under it.")
  return bool(m)


def resolve_mask(mask: Mask | None, params: Any, default: Callable[[Any], bool]) -> Any:
  """A pytree of Python bools with the structure of ``params``.

  A bool in ``mask`` stands for every leaf of the params subtree at its
  place (a prefix mask, as ``optax.masked`` takes). ``default`` chooses the
  leaves when ``mask`` is None, and is expected to skip non-float leaves; a
  user mask that selects one (an int, bool or complex array) is an error,
  since the transforms and quantizers would truncate or drop part of it.

  Args:
    mask: None (use ``default`` per leaf), a pytree of bools (the params'
      structure or a prefix of it), or a callable returning one.
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct`` leaves).
    default: leaf -> bool, used when ``mask`` is None.

  Raises:
    ValueError: naming ``mask``, if it is not such a pytree of bools, or if it
      selects a leaf that is not a floating-point array (naming its path).

  Example:
    >>> import jax.numpy as jnp
    >>> from softshare_jax import masks
    >>> params = {"a": {"w": jnp.ones(2), "b": jnp.ones(2)}, "c": jnp.ones(2)}
    >>> masks.resolve_mask({"a": True, "c": False}, params, masks.is_float_leaf)
    {'a': {'b': True, 'w': True}, 'c': False}
  """
  if mask is None:
    return jax.tree.map(default, params)
  if callable(mask):
    mask = mask(params)
  flat_mask, mask_def = jax.tree_util.tree_flatten_with_path(mask)
  try:
    # The params subtree under each mask leaf (the mask is a prefix); a mask
    # deeper than the params is a structure error, not a truthy subtree.
    subtrees = mask_def.flatten_up_to(params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "mask must be a pytree of bools with the structure of the params or a prefix of it "
        f"(or a callable returning one): {e}"
    ) from None
  out = mask_def.unflatten([jax.tree.map(lambda _, on=_as_bool(path, m): on, sub)
                            for (path, m), sub in zip(flat_mask, subtrees)])
  for (path, leaf), on in zip(leaves_with_paths(params), jax.tree.leaves(out)):
    if on and not is_float_leaf(leaf):
      raise ValueError(f"mask selects params leaf {path!r}, which is not a floating-point array (dtype "
                       f"{getattr(leaf, 'dtype', type(leaf).__name__)}); leave it out of the mask.")
  return out


def is_float_leaf(leaf: Any) -> bool:
  """True for floating-point array leaves (the default mask of the prox)."""
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def is_kernel_leaf(leaf: Any) -> bool:
  """True for floating-point leaves with ndim >= 2: kernels, not biases or norm scales."""
  return is_float_leaf(leaf) and len(getattr(leaf, "shape", ())) >= 2


# The attribute a Flax NNX Variable flattens through ("raw_value" in older Flax).
# An ``nnx.State`` names a kernel "conv/kernel/value", ``nnx.to_pure_dict`` of it
# and the updates ``nnx.Optimizer`` hands a transform "conv/kernel": a canonical
# path drops that key, so all three name the leaf the same way.
NNX_VALUE_KEYS = ("value", "raw_value")


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: tuple) -> str:
  """A key path as its keys joined by "/" (``"Dense_0/kernel"``, ``"layers/0/w"``), every key kept."""
  return "/".join(_key_name(k) for k in path)


def key_names(path: tuple) -> tuple[str, ...]:
  """A leaf's canonical key names: its keys' names, less a trailing NNX ``value``.

  Only an attribute key (``jax.tree_util.GetAttrKey``) named ``value`` or
  ``raw_value`` at the end of the path is dropped, the attribute a Flax NNX
  Variable holds its array in; a dict key ``"value"`` is a name like any other.

  Example:
    >>> from jax.tree_util import DictKey, GetAttrKey
    >>> from softshare_jax import masks
    >>> masks.key_names((DictKey("conv"), DictKey("kernel"), GetAttrKey("value")))
    ('conv', 'kernel')
    >>> masks.key_names((DictKey("conv"), DictKey("value")))
    ('conv', 'value')
  """
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name in NNX_VALUE_KEYS:
    path = path[:-1]
  return tuple(_key_name(k) for k in path)


def canonical_path(path: tuple) -> str:
  """A leaf's canonical path: :func:`key_names` joined by "/" (``"conv/kernel"``).

  Every tool that names or matches leaves by path uses it (quantized trees,
  files, ``keep_clusters``), so a leaf of an ``nnx.State``, of
  ``nnx.to_pure_dict(state)`` and of the updates ``nnx.Optimizer`` passes has
  one name, the name it would have in a plain dict.
  """
  return "/".join(key_names(path))


def leaves_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
  """``(canonical_path, leaf)`` for every leaf of ``tree``, in ``jax.tree`` order.

  Args:
    tree: any pytree: nested dicts, a Flax Linen tree, an ``nnx.State`` (with
      its Variables, or pure).
    is_leaf: as ``jax.tree_util.tree_flatten``'s.

  Example:
    >>> from flax import nnx
    >>> from softshare_jax import masks
    >>> state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
    >>> [p for p, _ in masks.leaves_with_paths(state)]
    ['bias', 'kernel']
    >>> [p for p, _ in masks.leaves_with_paths(nnx.to_pure_dict(state))]
    ['bias', 'kernel']
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(canonical_path(p), leaf) for p, leaf in flat]
