"""Masks: which leaves of a parameter tree a transform acts on.

A mask is what ``optax.masked`` takes: a pytree of bools with the structure of
the params (or a prefix of it), or a callable ``params -> such a pytree``.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

Mask = Union[Any, Callable[[Any], Any]]


def resolve_mask(mask: Mask | None, params: Any, default: Callable[[Any], bool]) -> Any:
  """A pytree of Python bools with the structure of ``params``.

  Args:
    mask: None (use ``default`` per leaf), a pytree of bools, or a callable
      returning one.
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct`` leaves).
    default: leaf -> bool, used when ``mask`` is None.
  """
  if mask is None:
    return jax.tree.map(default, params)
  if callable(mask):
    mask = mask(params)
  try:
    return jax.tree.map(lambda _, m: bool(m), params, mask)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "mask must be a pytree of bools with the structure of the params "
        f"(or a callable returning one): {e}"
    ) from None


def is_float_leaf(leaf: Any) -> bool:
  """True for floating-point array leaves (the default mask of the prox)."""
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def is_kernel_leaf(leaf: Any) -> bool:
  """True for floating-point leaves with ndim >= 2: kernels, not biases or norm scales."""
  return is_float_leaf(leaf) and len(getattr(leaf, "shape", ())) >= 2


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: tuple) -> str:
  """A key path as its keys joined by "/" (``"Dense_0/kernel"``, ``"layers/0/w"``)."""
  return "/".join(_key_name(k) for k in path)


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
  """``(path_str, leaf)`` for every leaf of ``tree``."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(p), leaf) for p, leaf in flat]
