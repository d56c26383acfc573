"""Compression: codebooks and indices, an honest size report, files, fine-tuning.

A trained network becomes a :class:`Quantized` pytree: every masked leaf is a
codebook plus one packed index per weight, every other leaf is kept as it is.
One concept per private module, re-exported here:

- ``_format``: the :class:`Quantized` / :class:`QuantizedLeaf` pytrees and
  index packing.
- ``_quantize``: :func:`quantize` from the learned mixture (Ullrich, Meeds &
  Welling 2017, §4.3) and :func:`dequantize`.
- ``_kmeans``: :func:`cluster_weights`, the per-tensor k-means baseline
  (TensorFlow Model Optimization, Core ML palettization).
- ``_hashing``: :func:`hash_clusters`, HashedNets' hashing trick.
- ``_keep``: :func:`keep_clusters`, fine-tuning with the clusters kept.
- ``_report``: :func:`compression_report`, Deep Compression's bit count.
- ``_fileio``: :func:`save_quantized` / :func:`load_quantized`, safetensors
  with JSON metadata (never pickle), :class:`QuantizedFileError`.

The accounting and the file layout are written out in docs/design.md §4.4-4.5.
"""

from softshare_jax.compress._fileio import load_quantized
from softshare_jax.compress._fileio import QuantizedFileError
from softshare_jax.compress._fileio import save_quantized
from softshare_jax.compress._format import Quantized
from softshare_jax.compress._format import QuantizedLeaf
from softshare_jax.compress._hashing import hash_clusters
from softshare_jax.compress._keep import keep_clusters
from softshare_jax.compress._keep import KeepClustersState
from softshare_jax.compress._kmeans import cluster_weights
from softshare_jax.compress._quantize import dequantize
from softshare_jax.compress._quantize import quantize
from softshare_jax.compress._report import compression_report
from softshare_jax.compress._report import CompressionReport
from softshare_jax.compress._report import LeafReport

__all__ = [
    "CompressionReport", "KeepClustersState", "LeafReport", "Quantized", "QuantizedFileError", "QuantizedLeaf",
    "cluster_weights", "compression_report", "dequantize", "hash_clusters", "keep_clusters", "load_quantized",
    "quantize", "save_quantized",
]
