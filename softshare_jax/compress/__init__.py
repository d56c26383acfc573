"""Compression: codebooks and indices, an honest size report, files, fine-tuning.

A trained network becomes a :class:`Quantized` pytree: every masked leaf is a
codebook plus one packed index per weight, every other leaf is kept as it is.
One concept per module, its public names re-exported here:

- ``quantized``: the :class:`Quantized` / :class:`QuantizedLeaf` pytrees and
  index packing.
- ``quantizer``: :func:`quantize` from the learned mixture (Ullrich, Meeds &
  Welling 2017, §4.3) and :func:`dequantize`.
- ``kmeans``: :func:`cluster_weights`, the per-tensor k-means baseline
  (TensorFlow Model Optimization, Core ML palettization).
- ``hashing``: :func:`hash_clusters`, HashedNets' hashing trick.
- ``keep``: :func:`keep_clusters`, fine-tuning with the clusters kept.
- ``report``: :func:`compression_report`, Deep Compression's bit count.
- ``fileio``: :func:`save_quantized` / :func:`load_quantized`, safetensors
  with JSON metadata (never pickle), :class:`QuantizedFileError`.

The accounting is written out in docs/design.md §4.4, the file layout in docs/file_format.md.
"""

from softshare_jax.compress.apply import compressed_apply
from softshare_jax.compress.fileio import load_quantized
from softshare_jax.compress.fileio import QuantizedFileError
from softshare_jax.compress.fileio import save_quantized
from softshare_jax.compress.quantized import Quantized
from softshare_jax.compress.quantized import QuantizedLeaf
from softshare_jax.compress.hashing import hash_clusters
from softshare_jax.compress.keep import keep_clusters
from softshare_jax.compress.keep import KeepClustersState
from softshare_jax.compress.kmeans import cluster_weights
from softshare_jax.compress.quantizer import dequantize
from softshare_jax.compress.quantizer import quantize
from softshare_jax.compress.report import compression_report
from softshare_jax.compress.report import CompressionReport
from softshare_jax.compress.report import LeafReport

__all__ = [
    "CompressionReport", "KeepClustersState", "LeafReport", "Quantized", "QuantizedFileError", "QuantizedLeaf",
    "cluster_weights", "compressed_apply", "compression_report", "dequantize", "hash_clusters", "keep_clusters",
    "load_quantized", "quantize", "save_quantized",
]
