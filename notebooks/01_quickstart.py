# %% [markdown]
# # softshare_jax in five minutes
#
# `softshare_jax` implements weight sharing as [Optax](https://github.com/google-deepmind/optax) gradient
# transformations. This notebook shows its three ideas on small examples:
#
# 1. **The exact weight-sharing prox** (Shakerinava, Sohrabi, Ravanbakhsh & Lacoste-Julien,
#    *Weight-sharing regularization*, AISTATS 2024). The regularizer
#    $R(w) = \frac{1}{d-1}\sum_{i>j}|w_i - w_j|$ pulls every pair of weights in a group together;
#    its proximal map `ss.prox_weight_sharing` merges weights into clusters of *exactly* equal values.
#    `ss.weight_sharing_prox` applies it after any optimizer (proximal gradient descent).
# 2. **Soft weight sharing** (Nowlan & Hinton, *Simplifying neural networks by soft weight-sharing*, 1992;
#    Ullrich, Meeds & Welling, *Soft weight-sharing for neural network compression*, ICLR 2017):
#    `ss.mixture_prior` adds the gradient of a learned mixture-of-Gaussians prior on the weights and learns the
#    mixture while the network trains.
# 3. Reading the result: `ss.sharing_stats` (distinct values per leaf) and `ss.get_mixture` (the learned mixture).
#
# Data: scikit-learn's 8×8 digits (bundled with the package, nothing is downloaded).
# By default the notebook runs in a quick mode (few epochs); set `SOFTSHARE_FULL=1` for longer runs.

# %%
# %matplotlib inline
import os, warnings
import numpy as np
import jax, jax.numpy as jnp
import optax
import matplotlib.pyplot as plt
import softshare_jax as ss

warnings.filterwarnings("ignore")
FULL = os.environ.get("SOFTSHARE_FULL", "0") == "1"   # quick mode by default
SEED = 0
plt.rcParams.update({"figure.dpi": 90, "axes.grid": True, "grid.alpha": 0.3})
print(f"mode: {'full' if FULL else 'quick'}, JAX backend: {jax.default_backend()}")

# %% [markdown]
# ## 1. The prox on a toy vector
#
# `ss.prox_weight_sharing(y, t)` solves $\arg\min_w \tfrac12\|w-y\|^2 + t\,R(w)$ exactly. Each value moves by at
# most $t$, the order of the values is kept, and values whose paths meet form one cluster. Below, 40 random
# values (sorted for display) and their prox for increasing strengths $t$: flat steps are shared weights.

# %%
y = np.sort(np.random.default_rng(SEED).normal(0.0, 1.0, 40)).astype(np.float32)
strengths = [0.0, 0.1, 0.3, 1.0, 3.0]

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for t in strengths:
    w = np.asarray(ss.prox_weight_sharing(jnp.asarray(y), t))
    axes[0].step(np.arange(len(y)), w, where="mid", label=f"t = {t}")
    axes[1].plot(y, w, ".-", ms=4, label=f"t = {t}")
    print(f"t = {t:<4}: {len(np.unique(w)):2d} distinct values, R(w) = {float(ss.weight_sharing_penalty(jnp.asarray(w))):.3f}")
axes[0].set(xlabel="index (sorted by y)", ylabel="prox(y)", title="prox(y): values merge into flat steps")
axes[1].set(xlabel="y", ylabel="prox(y)", title="prox as a map y -> w (diagonal: t = 0)")
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# With `axis=...` the prox works on groups: `axis=0` on a Dense kernel `(in, out)` makes each output neuron's
# incoming weights one group, so every neuron gets its own few shared values.

# %%
W = jnp.asarray(np.random.default_rng(1).normal(0, 1, (6, 3)).astype(np.float32))
P = ss.prox_weight_sharing(W, 0.5, axis=0)         # one group per column
print("distinct values per column before:", [len(np.unique(W[:, j])) for j in range(3)])
print("distinct values per column after: ", [len(np.unique(P[:, j])) for j in range(3)])

# %% [markdown]
# ## 2. An MLP on the digits, with and without the prox
#
# The same SGD (momentum 0.9), data order and initialization twice; the second run chains
# `ss.weight_sharing_prox` **last**, with the optimizer's learning rate, on the kernels only (biases are left alone).
#
# The data, model and training loop are the repository's shared ones (`benchmarks/digits.py`, `benchmarks/training.py`):
# a plain Optax loop, one jitted `lax.scan` per epoch, with one requirement of the softshare transforms:
# `tx.update(grads, state, params)` must be given the parameters.

# %%
import sys
sys.path.insert(0, os.path.abspath(".."))          # the repository root (a notebook runs from notebooks/)
from benchmarks import digits, training              # the shared digits task and training loop of the benchmarks

task = digits.DigitsTask.load(SEED)               # 1797 images of 8x8 pixels, standardized, 75/25 split; a 64-64-10 MLP
init_params = task.init(SEED)
kernel_weights = training.kernel_values              # all kernel weights in one flat array
# task.train(tx, params, epochs, seed): minibatches of 64, one jitted lax.scan per epoch;
# the same data order for a seed. task.accuracy(params): test accuracy.

print(f"digits: {len(task.data.x_train)} train / {len(task.data.x_test)} test images")

# %%
EPOCHS, STRENGTH = (40, 0.01) if FULL else (15, 0.02)   # the prox moves a weight by at most STRENGTH * LR per step
LR = 0.05
is_kernel = training.kernel_mask                     # a pytree of booleans: True on the kernels, False on the biases

plain_tx = optax.sgd(LR, momentum=0.9)
prox_tx = optax.chain(optax.sgd(LR, momentum=0.9),
                      ss.weight_sharing_prox(STRENGTH, LR, axis=0, mask=is_kernel))   # prox LAST

plain = task.train(plain_tx, init_params, EPOCHS).params
prox = task.train(prox_tx, init_params, EPOCHS).params
for name, p in [("plain SGD", plain), ("SGD + weight_sharing_prox", prox)]:
    stats = ss.sharing_stats(p, mask=is_kernel).total
    print(f"{name:<26} test accuracy {task.accuracy(p):.4f}   distinct kernel values {stats.distinct:5d} of {stats.weights}")

# %%
print("sharing_stats of the prox run (all leaves):")
print(ss.sharing_stats(prox))


# %%
def per_neuron_distinct(params, layer):
    w = np.asarray(params[layer]["kernel"])
    return np.array([len(np.unique(w[:, j])) for j in range(w.shape[1])])

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
layer = "Dense_0"
axes[0].hist([per_neuron_distinct(plain, layer), per_neuron_distinct(prox, layer)], bins=20,
             label=["plain", "prox"])
axes[0].set(xlabel="distinct incoming weights per neuron", ylabel="neurons", title=f"{layer}: 64 inputs per neuron")
axes[0].legend()
counts = per_neuron_distinct(prox, layer)
j = int(np.argsort(counts)[len(counts) // 4])      # a neuron at the lower quartile of distinct values
for name, p in [("plain", plain), ("prox", prox)]:
    axes[1].step(np.arange(64), np.sort(np.asarray(p[layer]["kernel"])[:, j]), where="mid", marker=".", ms=4, label=name)
axes[1].set(xlabel="incoming weight (sorted)", ylabel="value",
            title=f"{layer}, neuron {j}: sorted incoming weights ({counts[j]} distinct with the prox)")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Soft weight sharing: retrain with a learned mixture prior
#
# `ss.mixture_prior` goes **before** the optimizer (like `optax.add_decayed_weights`). It follows one
# recipe (its docstring; `benchmarks/recipe.py`): start from a trained network (here the plain SGD run
# above) and retrain it with 16 components plus Ullrich's zero component (mean fixed at 0, proportion
# 0.99), the mixture re-estimated by EM under Gamma hyper-priors, at strength 0.012 / N.
# `ss.get_mixture(opt_state)` returns the mixture; `02_compression.ipynb` quantizes it.

# %%
N = len(task.data.x_train)
mix_tx = optax.chain(ss.mixture_prior(16, 0.012 / N, zero_weight=0.99, mixture_update="em",
                                      precision_prior=(250.0, 0.1), zero_precision_prior=(5000.0, 2.0)),
                     optax.adam(1e-3))
run = task.train(mix_tx, plain, 100 if FULL else 30)
soft, soft_state = run.params, run.state
mixture = ss.get_mixture(soft_state)
print(f"retrained with mixture_prior: test accuracy {task.accuracy(soft):.4f}")
print("learned mixture: component 0 is the zero component")
for j, (m, s, pi) in enumerate(zip(mixture.means, mixture.stddevs, mixture.weights)):
    print(f"  {j:2d}  mean {float(m):+.3f}  stddev {float(s):.3f}  weight {float(pi):.4f}")

# %%
w = kernel_weights(soft)
grid = np.linspace(w.min() - 0.05, w.max() + 0.05, 2000)
density = np.exp(np.asarray(ss.mixture_log_prob(mixture, jnp.asarray(grid, jnp.float32))))

fig, ax = plt.subplots(figsize=(10, 4))
ax.hist(w, bins=150, density=True, alpha=0.5, label="kernel weights after training")
ax.plot(grid, density, color="C3", lw=1.2, label="learned mixture density")
ax.plot(np.asarray(mixture.means), np.full(mixture.num_components, 2e-2), "v", color="C3", label="component means")
ax.set_yscale("log"); ax.set_ylim(1e-2, None)
ax.set(xlabel="weight", ylabel="density (log scale)", title="digits MLP, Adam + mixture_prior (16 + zero component)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What the output shows
#
# * **Prox on a toy vector**: as $t$ grows the printed number of distinct values falls, the staircase in the left
#   plot gets fewer, wider steps, and $R(w)$ drops; at large $t$ everything merges towards the mean.
#   The map $y \mapsto \text{prox}(y)$ (right) is monotone and piecewise flat.
# * **MLP with `weight_sharing_prox`**: the printed table compares test accuracy and the number of distinct kernel
#   values of the plain and the prox run: the prox run keeps a comparable accuracy with far fewer distinct values.
#   The histogram shows how this is spread over the first layer's neurons: many use only a handful of shared
#   incoming values, others keep most of theirs (in the plain run every weight is distinct). The right plot shows
#   one neuron's sorted weights: with the prox, a staircase of shared values.
# * **MLP with `mixture_prior`**: the weights' histogram and the learned mixture density; with this gentle strength
#   the mixture follows the weights (a peak at 0 and components over the range). `02_compression.ipynb` uses a
#   stronger prior and turns the mixture into a compressed model.
