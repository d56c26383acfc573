"""The mixture-of-Gaussians prior's mathematics (Nowlan & Hinton 1992; Ullrich et al. 2017).

One concept per private module, re-exported here:

- ``_model``: the :class:`Mixture` pytree (means, precisions, proportions).
- ``_density``: log-densities and responsibilities, in log space.
- ``_statistics``: the sufficient statistics N_j, Σ r d, Σ r d², chunked;
  the weights' and the mixture's gradients follow from them.
- ``_hyper``: the Gamma / Beta hyper-priors, their checks and cost.
- ``_init``: starting mixtures; ``_em``: the closed-form EM step;
  ``_merge``: merging close components after training.

The math is written out in docs/design.md §4.1.
"""

from softshare_jax.mixture._density import mixture_log_prob
from softshare_jax.mixture._density import responsibilities
from softshare_jax.mixture._em import em_step
from softshare_jax.mixture._init import init_mixture
from softshare_jax.mixture._merge import merge_components
from softshare_jax.mixture._model import Mixture

__all__ = ["Mixture", "em_step", "init_mixture", "merge_components", "mixture_log_prob", "responsibilities"]
