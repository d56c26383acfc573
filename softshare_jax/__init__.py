"""softshare_jax: weight sharing for JAX as Optax gradient transformations."""

from softshare_jax.sharing import LeafStats
from softshare_jax.sharing import prox_weight_sharing
from softshare_jax.sharing import sharing_stats
from softshare_jax.sharing import SharingStats
from softshare_jax.sharing import weight_sharing_penalty
from softshare_jax.sharing import weight_sharing_prox
from softshare_jax.sharing import WeightSharingProxState

__version__ = "0.1.0"

__all__ = [
    "LeafStats",
    "SharingStats",
    "WeightSharingProxState",
    "prox_weight_sharing",
    "sharing_stats",
    "weight_sharing_penalty",
    "weight_sharing_prox",
]
