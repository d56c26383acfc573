"""Quantizing with the learned mixture (Ullrich et al. 2017, §4.3), and back.

Also the driver every quantizer shares: :func:`map_masked` applies a per-leaf
function to the masked leaves of a params tree, :func:`host_weights` brings a
leaf to the host in float64 after checking it.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from softshare_jax import checks
from softshare_jax import masks
from softshare_jax.compress.quantized import check_quantized
from softshare_jax.compress.quantized import is_qleaf
from softshare_jax.compress.quantized import leaf_from_values
from softshare_jax.compress.quantized import Quantized
from softshare_jax.mixture.model import check_finite_mixture
from softshare_jax.mixture.model import Mixture

_ASSIGNMENTS = ("map", "ml")
# Weights × components per block when assigning components: one float64
# (block, K) array of 32 MiB, whatever the number of weights and of components.
_BLOCK_BUDGET = 1 << 22


def block_rows(num_components: int) -> int:
  """Weights per block for a K-component mixture: block × K ≤ 2**22 (at least one weight)."""
  return max(1, _BLOCK_BUDGET // max(1, int(num_components)))


def host_weights(path: str, leaf: Any) -> np.ndarray:
  if not masks.is_float_leaf(leaf):
    raise ValueError(f"params leaf {path!r} is not a floating-point array (dtype "
                     f"{getattr(leaf, 'dtype', type(leaf).__name__)}); leave it out with mask.")
  w = np.asarray(jax.device_get(leaf)).astype(np.float64)
  if not np.all(np.isfinite(w)):
    raise ValueError(f"params leaf {path!r} has non-finite values (NaN or Inf); cannot quantize it.")
  return w


def map_masked(name: str, params: Any, mask: Any, fn) -> Quantized:
  """Applies ``fn(i, path, leaf) -> QuantizedLeaf`` to the masked leaves (i counts them)."""
  keep = masks.resolve_mask(mask, params, masks.is_kernel_leaf)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  on = jax.tree_util.tree_leaves(keep)
  out, count = [], 0
  for (path, leaf), selected in zip(flat, on):
    if selected:
      out.append(fn(count, masks.path_str(path), leaf))
      count += 1
    else:
      out.append(leaf)
  if count == 0:
    raise ValueError(f"{name}: mask selects no leaf of params (the default selects float leaves "
                     "with ndim >= 2); pass mask=.")
  return Quantized(jax.tree_util.tree_unflatten(treedef, out))


def _component_of(w: np.ndarray, mix: tuple[np.ndarray, np.ndarray, np.ndarray], use_weights: bool) -> np.ndarray:
  """argmax_j [log π_j] + log N(w | μ_j, 1/λ_j), float64, :func:`block_rows` weights at a time."""
  mu, gamma, log_pi = mix
  half_lam = -0.5 * np.exp(gamma)
  base = 0.5 * gamma + (log_pi if use_weights else 0.0)
  out = np.empty(w.size, np.int64)
  flat = w.ravel()
  step = min(block_rows(mu.size), max(flat.size, 1))
  buf = np.empty((step, mu.size))  # the one (block, K) array: every step works in place in it
  for s in range(0, flat.size, step):
    x = flat[s:s + step, None]
    t = np.subtract(x, mu, out=buf[:x.shape[0]])
    np.square(t, out=t)
    t *= half_lam
    t += base
    out[s:s + step] = np.argmax(t, axis=1)
  return out


def quantize(params: Any, mixture: Mixture | None, *, mask: Any = None,
             assignment: str = "map") -> Quantized:
  """Replaces each masked weight by a shared value: codebook + packed indices.

  With a mixture (Ullrich et al. 2017, §4.3), weight w gets the mean of
  component

      "map":  argmax_j  π_j N(w | μ_j, σ_j²)   (most responsible)
      "ml":   argmax_j      N(w | μ_j, σ_j²)   (most likely)

  so weights of the zero component (μ_0 = 0) become exact zeros. Usually
  preceded by :func:`~softshare_jax.merge_components`. Each leaf keeps its own
  codebook: the means its weights use, rounded to the leaf's dtype, sorted and
  distinct (components no weight of the leaf uses are dropped). With
  ``mixture=None`` a leaf's distinct values are its codebook: lossless packing
  of weights that already share values (at most 256 per leaf).

  ``quantize(dequantize(q), None)`` gives back ``q``; so does
  ``quantize(dequantize(q), mixture)`` whenever every used mean is assigned to
  its own component (true unless a component is hidden under another).

  Runs on the host (float64), not under ``jit``, a block of at most 2**22
  weights × components at a time (32 MiB whatever K). A mixture with a NaN
  or Inf parameter (or a precision exp(γ) that overflows float32) is rejected
  with a ``ValueError``: its codebook or assignments would be meaningless.

  Args:
    params: a pytree of arrays.
    mixture: a :class:`~softshare_jax.Mixture` (e.g. ``ss.get_mixture(state)``)
      or None.
    mask: which leaves to quantize (pytree of bools, a prefix of one, or a
      callable; default: float leaves with ndim >= 2, as ``mixture_prior``).
    assignment: ``"map"`` or ``"ml"``.

  Returns:
    A :class:`Quantized`.

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> m = ss.Mixture(free_means=jnp.array([-0.5, 0.5]), log_precisions=jnp.full(3, 4.0),
    ...                logits=jnp.zeros(2), zero_logit=jnp.array(0.0))
    >>> q = ss.quantize({"w": jnp.array([[-0.4, 0.05], [0.6, -0.02]])}, m)
    >>> q.tree["w"].codebook, ss.dequantize(q)["w"]
    (Array([-0.5,  0. ,  0.5], dtype=float32), Array([[-0.5,  0. ], [ 0.5,  0. ]], dtype=float32))
  """
  checks.check_choice("assignment", assignment, _ASSIGNMENTS)
  mix = None
  if mixture is not None:
    check_finite_mixture(mixture)
    mix = tuple(np.asarray(jax.device_get(a), np.float64)
                for a in (mixture.means, mixture.log_precisions, mixture.log_weights))

  def one(_, path, leaf):
    w = host_weights(path, leaf)
    values = w if mix is None else mix[0][_component_of(w, mix, assignment == "map")]
    return leaf_from_values(path, values, w.shape, leaf.dtype)

  return map_masked("quantize", params, mask, one)


def dequantize(quantized: Quantized) -> Any:
  """The params tree back: every quantized leaf is its codebook values (traceable).

  Example:
    >>> import jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> q = ss.quantize({"w": jnp.array([[0.25, -1.0], [0.25, 0.25]])}, None)
    >>> ss.dequantize(q)["w"]
    Array([[ 0.25, -1.  ], [ 0.25,  0.25]], dtype=float32)
  """
  check_quantized(quantized)
  return jax.tree.map(lambda x: x.values() if is_qleaf(x) else x, quantized.tree, is_leaf=is_qleaf)
