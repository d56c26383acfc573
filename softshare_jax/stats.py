"""How much the weights share: distinct values and exact zeros, per leaf."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from softshare_jax import masks


@dataclasses.dataclass(frozen=True)
class LeafStats:
  """Counts for one leaf (or the total): weights, distinct values, exact zeros."""

  weights: int
  distinct: int
  zeros: int


@dataclasses.dataclass(frozen=True)
class SharingStats:
  """Per-leaf and total :class:`LeafStats`; ``str()`` is a table.

  ``total.distinct`` adds up the leaves' distinct values: the codebook entries
  needed when every leaf keeps its own codebook.
  """

  leaves: dict[str, LeafStats]
  total: LeafStats

  def to_dict(self) -> dict:
    return {"leaves": {k: dataclasses.asdict(v) for k, v in self.leaves.items()},
            "total": dataclasses.asdict(self.total)}

  def __str__(self) -> str:
    rows = [(k, v) for k, v in self.leaves.items()] + [("total", self.total)]
    width = max(len("leaf"), *(len(k) for k, _ in rows))
    lines = [f"{'leaf':<{width}} {'weights':>10} {'distinct':>10} {'zeros':>10}"]
    lines += [f"{k:<{width}} {v.weights:>10} {v.distinct:>10} {v.zeros:>10}" for k, v in rows]
    return "\n".join(lines)


def sharing_stats(params: Any, mask: Any = None) -> SharingStats:
  """How much the weights share: per leaf, the weights, distinct values and zeros.

  Args:
    params: a pytree of arrays.
    mask: which leaves to count (pytree of bools or callable; default: every
      floating-point leaf).

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> stats = ss.sharing_stats({"w": jnp.array([0.0, 0.5, 0.5, 0.0])})
    >>> stats.leaves["w"]
    LeafStats(weights=4, distinct=2, zeros=2)
  """
  keep = masks.resolve_mask(mask, params, masks.is_float_leaf)
  leaves = {}
  for (path, leaf), (_, on) in zip(masks.leaves_with_paths(params), masks.leaves_with_paths(keep)):
    if not on:
      continue
    a = np.asarray(jax.device_get(leaf)).ravel()
    leaves[path] = LeafStats(int(a.size), int(np.unique(a).size), int(np.count_nonzero(a == 0)))
  total = LeafStats(*(sum(getattr(v, f) for v in leaves.values()) for f in ("weights", "distinct", "zeros")))
  return SharingStats(leaves, total)
