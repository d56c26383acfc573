"""Per-step cost of ``weight_sharing_prox`` on many small leaves against one leaf of the same size.

``optax.chain(optax.sgd(0.1), ss.weight_sharing_prox(...))`` under ``jax.jit``
on (a) ``n`` leaves of ``k x k`` and (b) one leaf of ``(n k^2)^(1/2)`` squared
(the baseline, measured in the same run), for each method and group layout.
The ratio many/one is the figure: the transform batches every leaf that needs
no communication into one host call (or one device kernel per group length),
so it should stay near 1 rather than grow with the number of leaves. The last
column times the host kernel alone on the same rows: with ``axis=0`` the many
leaves have 10x more, 10x shorter rows, and what that costs is the kernel's.

Timings are wall-clock medians on whatever machine runs this (noisy when it is
shared: compare the ratio, not the milliseconds).

    python -m benchmarks.prox_leaves            # 100 leaves of 64x64 vs one 640x640
    python -m benchmarks.prox_leaves --quick    # 20 leaves of 32x32, fewer repeats
"""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import softshare_jax as ss
from softshare_jax import isotonic
from benchmarks import common


def _step(tx: optax.GradientTransformation, params: dict):
  state = tx.init(params)
  grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
  update = jax.jit(tx.update)
  return lambda: update(grads, state, params)


def measure(n: int, k: int, method: str, axis, budget_s: float) -> dict:
  rng = np.random.default_rng(0)
  many = {f"w{i:03d}": jnp.asarray(rng.normal(size=(k, k)), jnp.float32) for i in range(n)}
  side = int(math.isqrt(n * k * k))
  one = {"w": jnp.asarray(rng.normal(size=(side, side)), jnp.float32)}
  tx = optax.chain(optax.sgd(0.1), ss.weight_sharing_prox(0.5, 0.1, axis=axis, method=method))
  t_many, _ = common.time_call(_step(tx, many), budget_s=budget_s)
  t_one, _ = common.time_call(_step(tx, one), budget_s=budget_s)
  # The host kernel alone on the same rows: what the row lengths cost, whatever the transform does.
  def rows(tree):
    return [np.asarray(w).reshape(1, -1) if axis is None else np.asarray(w).T.copy() for w in tree.values()]
  many_rows, one_rows = rows(many), rows(one)
  k_many, _ = common.time_call(lambda: [isotonic.prox_rows_host(r, 0.05) for r in many_rows], budget_s=budget_s)
  k_one, _ = common.time_call(lambda: [isotonic.prox_rows_host(r, 0.05) for r in one_rows], budget_s=budget_s)
  return {
      "method": method, "axis": axis, "leaves": n, "leaf_shape": [k, k], "one_shape": [side, side],
      "many": t_many.to_dict(), "one": t_one.to_dict(), "ratio": t_many.median_s / t_one.median_s,
      "host_kernel_ratio": k_many.median_s / k_one.median_s,
  }


def main(argv=None) -> int:
  parser = common.argument_parser("prox_leaves", __doc__, "20 leaves of 32x32, shorter timing")
  args = parser.parse_args(argv)
  n, k, budget = (20, 32, 0.5) if args.quick else (100, 64, 2.0)
  rec = common.Recorder("prox_leaves")
  rows = []
  for method in ("host", "device"):
    for axis in (None, 0):
      rows.append(measure(n, k, method, axis, budget))
  rec.stop()
  print(f"weight_sharing_prox: {n} leaves of {k}x{k} vs one leaf of the same size, backend={jax.default_backend()}")
  print(common.format_table(
      ["method", "axis", "many (ms)", "one (ms)", "many/one", "host kernel alone many/one"],
      [[r["method"], str(r["axis"]), common.fmt_ms(r["many"]["median_ms"] / 1e3),
        common.fmt_ms(r["one"]["median_ms"] / 1e3), common.fmt_ratio(r["ratio"]),
        common.fmt_ratio(r["host_kernel_ratio"])] for r in rows]))
  name = "prox_leaves_quick" if args.quick else "prox_leaves"
  print(rec.write(args.out, {"quick": args.quick, "results": rows}, name=name))
  return 0


if __name__ == "__main__":
  sys.exit(main())
