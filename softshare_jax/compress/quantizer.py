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
from softshare_jax.groups import Axis
from softshare_jax.compress.quantized import check_quantized
from softshare_jax.compress.quantized import is_qleaf
from softshare_jax.compress.quantized import check_codebook_dtype
from softshare_jax.compress.quantized import leaf_from_components
from softshare_jax.compress.quantized import leaf_from_values
from softshare_jax.compress.quantized import normalize_axis
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
  """argmax_j [log π_j] + log N(w | μ_j, 1/λ_j), float64, :func:`block_rows` weights at a time.

  The reference the fast path (:func:`assign_components`) must equal, and its
  fallback for weights near a tie.
  """
  mu, gamma, log_pi = mix
  half_lam = -0.5 * np.exp(gamma)
  base = 0.5 * gamma + (log_pi if use_weights else 0.0)
  return _blocked_argmax(np.asarray(w, np.float64).ravel(), mu, half_lam, base, None)


def _blocked_argmax(x: np.ndarray, mu, half_lam, base, cands: np.ndarray | None) -> np.ndarray:
  """argmax over the components (or over each weight's row of ``cands``), first index on ties."""
  k = mu.size if cands is None else cands.shape[1]
  out = np.empty(x.size, np.int64)
  step = min(block_rows(k), max(x.size, 1))
  for s in range(0, x.size, step):
    xs = x[s:s + step, None]
    if cands is None:
      m, h, b = mu, half_lam, base
    else:
      c = cands[s:s + step]
      m, h, b = mu[c], half_lam[c], base[c]
    # The same operations in the same order as for every weight: the scores are bit-identical.
    t = np.subtract(xs, m)
    np.square(t, out=t)
    t *= h
    t += b
    best = np.argmax(t, axis=1)
    out[s:s + step] = best if cands is None else np.take_along_axis(c, best[:, None], axis=1)[:, 0]
  return out


def _envelope_breaks(mu, h, base, lo: float, hi: float) -> np.ndarray:
  """Where the winning parabola changes on [lo, hi] (float64, approximate: candidates make it exact)."""
  def score(x):
    return base + h * (x - mu) ** 2

  span = hi - lo
  x, r = lo, int(np.argmax(score(lo)))
  breaks = []
  tiny = 1e-12 * max(span, abs(lo), abs(hi), 1e-300)
  with np.errstate(all="ignore"):
    for _ in range(4 * mu.size + 4):  # parabolas cross at most twice: at most 2K - 1 pieces
      a = h - h[r]
      b = 2 * h * (x - mu) - 2 * h[r] * (x - mu[r])
      c = score(x) - score(x)[r]
      disc = b * b - 4 * a * c
      sq = np.sqrt(np.maximum(disc, 0))
      t1 = np.where(a != 0, (-b - sq) / (2 * a), np.where(b > 0, -c / b, np.inf))
      t2 = np.where(a != 0, (-b + sq) / (2 * a), np.inf)
      t1 = np.where((disc >= 0) & (t1 > tiny), t1, np.inf)
      t2 = np.where((disc >= 0) & (t2 > tiny), t2, np.inf)
      t = np.minimum(t1, t2)
      t[r] = np.inf
      step = float(np.min(t))
      if not np.isfinite(step) or x + step >= hi:
        break
      x = x + step
      nxt = int(np.argmax(score(min(x + 1e-9 * span, hi))))
      if nxt != r:
        breaks.append(x)
        r = nxt
  return np.asarray(breaks, np.float64)


def _candidates(mu, h, base, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """``(pieces, K)``: may component j win (in float64) somewhere on the closed piece [a, b]?"""
  ref = np.argmax(base + h * ((a + b) / 2 - mu) ** 2, axis=1)
  hr, mr, br = h[ref][:, None], mu[ref][:, None], base[ref][:, None]

  def diff(x):
    return (base + h * (x - mu) ** 2) - (br + hr * (x - mr) ** 2)

  with np.errstate(all="ignore"):
    vertex = np.where(h != hr, (h * mu - hr * mr) / (h - hr), a)
  vertex = np.clip(np.nan_to_num(vertex, nan=0.0, posinf=0.0, neginf=0.0), a, b)
  best = np.maximum(np.maximum(diff(a), diff(b)), diff(vertex))
  mag = np.abs(base) + np.abs(h) * np.maximum((a - mu) ** 2, (b - mu) ** 2)
  cand = best > -1e-10 * (mag + np.take_along_axis(mag, ref[:, None], axis=1)) - 1e-300
  cand[np.arange(ref.size), ref] = True
  return cand


def _pieces(mu, h, base, lo: float, hi: float, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Piece bounds (in the weights' dtype) and each closed piece's candidate components.

  A component is a candidate of piece [a, b] unless its exact score stays
  below the reference's by more than 1e-10 of their magnitudes on all of
  [a, b]; float64 scores err by under 1e-15 of it, so the rounded argmax over
  all components is always a candidate, and the argmax over the candidates
  (in index order, first on ties) is the blocked argmax's, bit for bit.
  """
  breaks = _envelope_breaks(mu, h, base, lo, hi)
  delta = 1e-4 * (hi - lo)  # a thin zone each side of a breakpoint, where two parabolas are close
  edges = np.concatenate([breaks - delta, breaks, breaks + delta])
  bounds = np.unique(edges.astype(dtype))
  bounds = bounds[(bounds > lo) & (bounds <= hi)]
  lows = np.concatenate([[lo], bounds.astype(np.float64)])
  highs = np.concatenate([bounds.astype(np.float64), [hi]])
  step = max(1, block_rows(mu.size) // 16)  # ~12 (pieces, K) temporaries: 24 MiB in all
  parts = []
  for s in range(0, lows.size, step):
    cand = _candidates(mu, h, base, lows[s:s + step, None], highs[s:s + step, None])
    count = cand.sum(axis=1)
    # Each row: its candidates in index order, padded by repeating the last (same argmax).
    order = np.argsort(~cand, axis=1, kind="stable")[:, :int(count.max())].copy()  # not a view of (b, K)
    parts.append((count, order))
  width = max(order.shape[1] for _, order in parts)
  count = np.concatenate([c for c, _ in parts])
  table = np.concatenate([np.pad(o, ((0, 0), (0, width - o.shape[1])), mode="edge") for _, o in parts])
  table = np.where(np.arange(width)[None, :] < count[:, None], table,
                   np.take_along_axis(table, (count - 1)[:, None], axis=1))
  return bounds, table, count


def assign_components(w: np.ndarray, mix: tuple[np.ndarray, np.ndarray, np.ndarray],
                      use_weights: bool) -> np.ndarray:
  """The blocked argmax of :func:`_component_of`, exactly, in O(N log K) and no (N, K) array.

  In 1-D the score is an upper envelope of K parabolas, so the winner is
  piecewise constant in w: the pieces are found once (O(K²) on the host), a
  weight's piece by ``np.searchsorted`` in the weights' own dtype, and only
  weights in the thin zones around breakpoints (several candidates) have
  their candidates' scores computed, with the same float64 operations.
  """
  mu, gamma, log_pi = mix
  half_lam = -0.5 * np.exp(gamma)
  base = 0.5 * gamma + (log_pi if use_weights else 0.0)
  x = np.asarray(w).ravel()
  if x.dtype != np.float64:
    x = x.astype(np.float32, copy=False)  # bf16 and f16 embed exactly; comparisons stay exact
  if x.size == 0:
    return np.zeros(0, np.int64)
  lo, hi = float(x.min()), float(x.max())
  bounds, table, count = _pieces(mu, half_lam, base, lo, hi, x.dtype)
  piece = np.searchsorted(bounds, x, side="right")
  if table.shape[1] == 1:
    return table[piece, 0]
  out = table[:, 0][piece]
  several = np.flatnonzero(count[piece] > 1)
  if several.size:
    out[several] = _blocked_argmax(x[several].astype(np.float64), mu, half_lam, base, table[piece[several]])
  return out


def leaf_array(path: str, leaf: Any) -> np.ndarray:
  """A float leaf on the host in its own dtype (no float64 copy); checks it is finite."""
  if not masks.is_float_leaf(leaf):
    raise ValueError(f"params leaf {path!r} is not a floating-point array (dtype "
                     f"{getattr(leaf, 'dtype', type(leaf).__name__)}); leave it out with mask.")
  w = np.asarray(jax.device_get(leaf))
  if not np.isfinite(w.max(initial=0.0)) or not np.isfinite(w.min(initial=0.0)):  # NaN propagates into both
    raise ValueError(f"params leaf {path!r} has non-finite values (NaN or Inf); cannot quantize it.")
  return w


def quantize(params: Any, mixture: Mixture | None, *, axis: Axis = None, mask: Any = None,
             assignment: str = "map", codebook_dtype: Any = "float32") -> Quantized:
  """Replaces each masked weight by a shared value: codebook + packed indices.

  With a mixture (Ullrich et al. 2017, §4.3), weight w gets the mean of
  component

      "map":  argmax_j  π_j N(w | μ_j, σ_j²)   (most responsible)
      "ml":   argmax_j      N(w | μ_j, σ_j²)   (most likely)

  so weights of the zero component (μ_0 = 0) become exact zeros. Usually
  preceded by :func:`~softshare_jax.merge_components`. Each group keeps its
  own codebook: the means its weights use, rounded to the leaf's dtype (then
  to ``codebook_dtype``), sorted and distinct (components no weight of the
  group uses are dropped). With ``mixture=None`` a group's distinct values
  are its codebook: lossless packing of weights that already share values
  (at most 256 per group).

  Groups: ``axis`` means what it means for
  :func:`~softshare_jax.prox_weight_sharing`, the axes that form one group.
  None (default) makes the whole leaf one group (a ``(K,)`` codebook);
  ``axis=0`` on a Dense kernel ``(in, out)`` gives one codebook per output
  neuron, stored as a ``(out, K)`` array (K the largest group's count,
  shorter rows padded with their last entry). So a prox-trained layer with
  thousands of distinct values per leaf but at most 256 per neuron packs
  losslessly with ``quantize(params, None, axis=0)``. Indices take
  ceil(log2 K) bits (1 when K = 1).

  ``codebook_dtype``: ``"float32"`` (default), ``"bfloat16"``, ``"float16"``
  or ``"int8"`` (entries in [-127, 127] times a float32 scale per group,
  max|value| / 127). Narrower codebooks round the shared values once more.

  ``quantize(dequantize(q), None, axis=...)`` gives back ``q`` (float32
  codebooks); so does ``quantize(dequantize(q), mixture)`` whenever every
  used mean is assigned to its own component (true unless a component is
  hidden under another).

  Runs on the host, leaf by leaf, not under ``jit``. The assignment is
  exactly the float64 argmax over all components (first on ties) but costs
  O(N log K) and no (N, K) array: the upper envelope of the K parabolas
  decides each weight except those within a thin zone around a breakpoint,
  which are scored against the few components near the top there. A
  mixture with a NaN or Inf parameter (or a precision exp(γ) that overflows
  float32) is rejected with a ``ValueError``: its codebook or assignments
  would be meaningless.

  Args:
    params: a pytree of arrays.
    mixture: a :class:`~softshare_jax.Mixture` (e.g. ``ss.get_mixture(state)``)
      or None.
    axis: None, an int or a tuple of ints: the axes of one group.
    mask: which leaves to quantize (pytree of bools, a prefix of one, or a
      callable; default: float leaves with ndim >= 2, as ``mixture_prior``).
    assignment: ``"map"`` or ``"ml"``.
    codebook_dtype: the codebook's dtype (a name or a dtype).

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

    One codebook per output neuron (column), int8 entries:

    >>> w = jnp.array([[1.0, 0.25], [1.0, -0.5], [0.5, 0.25]])
    >>> leaf = ss.quantize({"w": w}, None, axis=0, codebook_dtype="int8").tree["w"]
    >>> leaf.codebook.tolist(), leaf.scale.tolist(), leaf.bits
    ([[64, 127], [-127, 64]], [0.007874015718698502, 0.003937007859349251], 1)
  """
  checks.check_choice("assignment", assignment, _ASSIGNMENTS)
  cb = check_codebook_dtype(codebook_dtype)
  mix = None
  if mixture is not None:
    check_finite_mixture(mixture)
    mix = tuple(np.asarray(jax.device_get(a), np.float64)
                for a in (mixture.means, mixture.log_precisions, mixture.log_weights))

  def one(_, path, leaf):
    w = leaf_array(path, leaf)
    axes = normalize_axis(w.shape, axis)
    if mix is None:
      return leaf_from_values(path, w, w.shape, leaf.dtype, axis=axes, codebook_dtype=cb)
    comp = assign_components(w, mix, assignment == "map")
    return leaf_from_components(path, comp, mix[0], w.shape, leaf.dtype, axis=axes, codebook_dtype=cb)

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
  return jax.tree.map(lambda x: _decode(x) if is_qleaf(x) else x, quantized.tree, is_leaf=is_qleaf)


# One compiled decoder per leaf layout: eagerly, QuantizedLeaf.values() would dispatch (and on first use
# compile) a dozen primitives per leaf; under an outer jit this inlines.
_decode = jax.jit(lambda leaf: leaf.values())
