"""Memory and speed of ``ss.compressed_apply`` on a jitted MLP forward pass.

    python -m benchmarks.compressed_apply [--quick] [--out DIR]

The model: ``LAYERS`` dense layers of ``WIDTH x WIDTH`` (float32 kernels,
zero biases, ReLU), a batch of ``BATCH``; the kernels drawn from a grid of
16 or 4 values, so that ``ss.quantize(params, None)`` packs them losslessly
into 4-bit or 2-bit indices (the biases stay dense). Three jitted forward
passes, measured in the same run:

* dense: ``jit(f)(params, x)`` on the float32 params (the speed baseline);
* dequantize-then-apply: ``jit(lambda q, x: f(ss.dequantize(q), x))``;
* compressed_apply: ``jit(lambda q, x: ss.compressed_apply(f, q, x))``.

Columns: temporaries (``compiled.memory_analysis().temp_size_in_bytes``), the
packed bytes (every array of the ``Quantized``), the dense bytes (every array
of the params), the ratio of the temporaries to packed bytes + 3 dense layers
(the goal: at most 1), the median step time and its ratio to the dense
model's. The outputs of the two compressed passes are compared bitwise.
``--quick``: 6 layers of 256 (a smoke test). Writes
``<out>/compressed_apply.json`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import softshare_jax as ss

from benchmarks import common

LAYERS = 6
WIDTH = 2048
QUICK_WIDTH = 256
BATCH = 32
CODEBOOKS = (16, 4)
METHODS = ("dense", "dequantize-then-apply", "compressed_apply")


def mlp(params: list[dict[str, Any]], x: jax.Array) -> jax.Array:
  for layer in params:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x


def make_params(width: int, entries: int, seed: int = 0) -> list[dict[str, Any]]:
  """Kernels with ``entries`` distinct values (scaled for unit-variance activations), zero biases."""
  rng = np.random.default_rng(seed)
  grid = np.linspace(-1.0, 1.0, entries) * np.sqrt(3.0 / width)
  return [{"w": jnp.asarray(rng.choice(grid, size=(width, width)), jnp.float32), "b": jnp.zeros(width, jnp.float32)}
          for _ in range(LAYERS)]


def nbytes(tree: Any) -> int:
  return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree)))


def measure(width: int, entries: int, quick: bool) -> list[dict]:
  """One row per method for one codebook size."""
  params = make_params(width, entries)
  q = ss.quantize(params, None)
  x = jax.random.normal(jax.random.key(1), (BATCH, width), jnp.float32)
  packed, dense, layer = nbytes(q), nbytes(params), width * width * 4
  bound = packed + 3 * layer
  fns = {
      "dense": (jax.jit(mlp), params),
      "dequantize-then-apply": (jax.jit(lambda q, x: mlp(ss.dequantize(q), x)), q),
      "compressed_apply": (jax.jit(lambda q, x: ss.compressed_apply(mlp, q, x)), q),
  }
  rows, outs, base_s = [], {}, None
  for method, (fn, tree) in fns.items():
    compiled = fn.lower(tree, x).compile()
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
    budget = 0.5 if quick else 3.0
    timing, outs[method] = common.time_call(lambda: compiled(tree, x), warmup=1, min_repeats=3,
                                             max_repeats=7 if quick else 30, budget_s=budget)
    base_s = timing.median_s if method == "dense" else base_s
    rows.append({"codebook_entries": entries, "index_bits": int(q.tree[0]["w"].bits), "method": method,
                 "temp_bytes": temp, "packed_bytes": packed, "dense_bytes": dense, "layer_bytes": layer,
                 "bound_bytes": bound, "temp_over_bound": temp / bound, "median_ms": timing.median_s * 1e3,
                 "ratio_to_dense": timing.median_s / base_s, "timing": timing.to_dict()})
  same = bool(np.array_equal(np.asarray(outs["compressed_apply"]), np.asarray(outs["dequantize-then-apply"])))
  for row in rows:
    row["equal_to_dequantize_then_apply"] = same if row["method"] != "dense" else None
  return rows


def table(rows: list[dict]) -> str:
  mib = lambda b: f"{b / 2**20:.2f}"
  return common.format_table(
      ["K", "method", "temp MiB", "packed MiB", "dense MiB", "temp/(packed+3 layers)", "median ms", "vs dense"],
      [[r["codebook_entries"], r["method"], mib(r["temp_bytes"]), mib(r["packed_bytes"]), mib(r["dense_bytes"]),
        common.fmt_ratio(r["temp_over_bound"]), common.fmt_ms(r["median_ms"] / 1e3),
        common.fmt_ratio(r["ratio_to_dense"])] for r in rows],
      align="><>>>>>>")


def main(argv=None) -> int:
  parser = common.argument_parser("compressed_apply", __doc__, f"{LAYERS} layers of {QUICK_WIDTH} (smoke test)")
  args = parser.parse_args(argv)
  width = QUICK_WIDTH if args.quick else WIDTH
  recorder = common.Recorder("compressed_apply")
  rows = [r for entries in CODEBOOKS for r in measure(width, entries, args.quick)]
  elapsed = recorder.stop()
  print(f"compressed_apply: {LAYERS} x {width} x {width} MLP, batch {BATCH}, backend {jax.default_backend()}, "
        f"{elapsed:.0f} s")
  print(table(rows))
  print("temp: compiled.memory_analysis().temp_size_in_bytes of the jitted forward pass; times are medians of "
        "the same run (noisy on a shared machine: compare ratios, not milliseconds).")
  path = recorder.write(args.out, {
      "settings": {
          "mode": "quick" if args.quick else "full",
          "layers": LAYERS, "width": width, "batch": BATCH, "codebook_entries": list(CODEBOOKS),
          "model": "x -> relu(x @ w + b), LAYERS times; float32 kernels on a grid of K values times "
                   "sqrt(3 / width), zero biases (kept dense)",
          "quantized": "ss.quantize(params, None): lossless, K-entry codebooks, ceil(log2 K)-bit indices",
          "methods": {
              "dense": "jax.jit(f)(params, x)",
              "dequantize-then-apply": "jax.jit(lambda q, x: f(ss.dequantize(q), x))",
              "compressed_apply": "jax.jit(lambda q, x: ss.compressed_apply(f, q, x))",
          },
          "bound": "packed_bytes + 3 * layer_bytes",
      },
      "rows": rows,
  })
  print(f"\nwrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
