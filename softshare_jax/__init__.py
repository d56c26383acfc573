"""softshare_jax: weight sharing for JAX as Optax gradient transformations.

The layers, each importing only those before it (docs/design.md §2):

- internal: ``checks`` (argument checks, schedules), ``files`` (atomic
  writes), ``groups`` (``axis`` → rows), ``masks`` (masks and key paths);
- math: ``mixture/`` (the mixture prior's math: pytree, densities,
  sufficient statistics, hyper-priors, initializers, EM, merging),
  ``isotonic`` (the prox kernels), ``sharing`` (the regularizer and its
  exact prox);
- transforms: ``prior`` (``mixture_prior``), ``sharing_prox``
  (``weight_sharing_prox``), ``tying`` (``soft_tie``, ``hard_tie``);
- compression: ``compress/`` (format, quantizers, ``keep_clusters``, the
  report, files), ``stats`` (``sharing_stats``).
"""

from softshare_jax.compress import cluster_weights
from softshare_jax.compress import compressed_apply
from softshare_jax.compress import compression_report
from softshare_jax.compress import CompressionReport
from softshare_jax.compress import dequantize
from softshare_jax.compress import hash_clusters
from softshare_jax.compress import keep_clusters
from softshare_jax.compress import KeepClustersState
from softshare_jax.compress import LeafReport
from softshare_jax.compress import load_quantized
from softshare_jax.compress import quantize
from softshare_jax.compress import Quantized
from softshare_jax.compress import QuantizedFileError
from softshare_jax.compress import QuantizedLeaf
from softshare_jax.compress import save_quantized
from softshare_jax.mixture import em_step
from softshare_jax.mixture import init_mixture
from softshare_jax.mixture import merge_components
from softshare_jax.mixture import Mixture
from softshare_jax.mixture import mixture_log_prob
from softshare_jax.mixture import mixture_penalty
from softshare_jax.mixture import responsibilities
from softshare_jax.prior import get_mixture
from softshare_jax.prior import mixture_adam
from softshare_jax.prior import mixture_prior
from softshare_jax.prior import MixturePriorState
from softshare_jax.sharing import prox_weight_sharing
from softshare_jax.sharing import weight_sharing_penalty
from softshare_jax.sharing_prox import weight_sharing_prox
from softshare_jax.sharing_prox import WeightSharingProxState
from softshare_jax.stats import LeafStats
from softshare_jax.stats import sharing_stats
from softshare_jax.stats import SharingStats
from softshare_jax.tying import hard_tie
from softshare_jax.tying import HardTieState
from softshare_jax.tying import soft_tie
from softshare_jax.tying import SoftTieState
from softshare_jax.tying import sync
from softshare_jax.tying import transposed

__version__ = "0.1.0"

__all__ = [
    "CompressionReport",
    "HardTieState",
    "KeepClustersState",
    "LeafReport",
    "LeafStats",
    "Mixture",
    "MixturePriorState",
    "Quantized",
    "QuantizedFileError",
    "QuantizedLeaf",
    "SharingStats",
    "SoftTieState",
    "WeightSharingProxState",
    "cluster_weights",
    "compressed_apply",
    "compression_report",
    "dequantize",
    "em_step",
    "get_mixture",
    "hard_tie",
    "hash_clusters",
    "init_mixture",
    "keep_clusters",
    "load_quantized",
    "merge_components",
    "mixture_adam",
    "mixture_log_prob",
    "mixture_penalty",
    "mixture_prior",
    "prox_weight_sharing",
    "quantize",
    "responsibilities",
    "save_quantized",
    "sharing_stats",
    "soft_tie",
    "sync",
    "transposed",
    "weight_sharing_penalty",
    "weight_sharing_prox",
]
