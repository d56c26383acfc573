"""k-means++ seeding of 1-D centres, then Lloyd iterations: the start of ``init="kmeans++"``
and of :func:`softshare_jax.cluster_weights`' baseline.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from softshare_jax.mixture.kmeanspp import kmeans_pp
  >>> kmeans_pp(jnp.array([0.0, 0.1, 5.0, 5.1]), 2, jax.random.key(0))
  Array([0.05, 5.05], dtype=float32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LLOYD_ITERATIONS = 10


def kmeans_pp(w: jax.Array, k: int, key: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii 2007) then Lloyd iterations; sorted centres.

  Only the weights where ``valid`` (all when None) are drawn or averaged. Memory
  is O(len(w) + k): nearest centres come from the sorted centres' midpoints,
  not from a (len(w), k) distance matrix, and the seeding is a loop, not k
  unrolled steps.
  """
  n = w.shape[0]
  keys = jax.random.split(key, k)
  if valid is None:
    first = jax.random.choice(keys[0], w)
    live = jnp.ones_like(w)
  else:
    live = valid.astype(w.dtype)
    w = jnp.where(valid, w, 0.0)
    first = jax.random.choice(keys[0], w, p=live / jnp.maximum(jnp.sum(live), 1.0))
  d2 = live * jnp.square(w - first)

  def seed(i, carry):
    centres, d2 = carry
    total = jnp.sum(d2)
    uniform = live / jnp.maximum(jnp.sum(live), 1.0) if valid is not None else 1.0 / n
    p = jnp.where(total > 0, d2 / jnp.where(total > 0, total, 1.0), uniform)
    c = jax.random.choice(keys[i], w, p=p)
    return centres.at[i].set(c), jnp.minimum(d2, live * jnp.square(w - c))

  centres = jnp.zeros((k,), w.dtype).at[0].set(first)
  centres, _ = jax.lax.fori_loop(1, k, seed, (centres, d2))

  def lloyd(_, c):
    c = jnp.sort(c)
    # In 1-D the nearest centre is the one between the neighbouring midpoints
    # (ties to the lower one, as argmin would).
    assign = jnp.searchsorted((c[1:] + c[:-1]) / 2, w, side="left")
    counts = jax.ops.segment_sum(live, assign, k)
    sums = jax.ops.segment_sum(live * w, assign, k)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c)

  centres = jax.lax.fori_loop(0, LLOYD_ITERATIONS, lloyd, centres)
  return jnp.sort(centres)
