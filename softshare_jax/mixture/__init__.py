"""The mixture-of-Gaussians prior's mathematics (Nowlan & Hinton 1992; Ullrich et al. 2017).

One concept per module, its public names re-exported here:

- ``model``: the :class:`Mixture` pytree (means, precisions, proportions).
- ``density``: log-densities and responsibilities, in log space.
- ``statistics``: the sufficient statistics N_j, Σ r d, Σ r d², chunked;
  the weights' and the mixture's gradients follow from them.
- ``hyper``: the Gamma / Beta hyper-priors, their checks and cost.
- ``init``: starting mixtures; ``em``: the closed-form EM step;
  ``merge``: merging close components after training;
  ``penalty``: the prior as a differentiable loss term.

The math is written out in docs/design.md §4.1.
"""

from softshare_jax.mixture.density import mixture_log_prob
from softshare_jax.mixture.density import responsibilities
from softshare_jax.mixture.em import em_step
from softshare_jax.mixture.init import init_mixture
from softshare_jax.mixture.merge import merge_components
from softshare_jax.mixture.model import Mixture
from softshare_jax.mixture.penalty import mixture_penalty

__all__ = ["Mixture", "em_step", "init_mixture", "merge_components", "mixture_log_prob", "mixture_penalty",
           "responsibilities"]
