# %% [markdown]
# # Compression with soft weight sharing (Ullrich, Meeds & Welling 2017)
#
# *Soft weight-sharing for neural network compression* (ICLR 2017) compresses a trained network in four steps:
#
# 1. **pretrain** the network as usual;
# 2. **retrain** it with a learned mixture-of-Gaussians prior on the weights (`ss.mixture_prior`), with a zero
#    component (mean 0) that collects most weights; the other components become the shared values;
# 3. **merge** close components (`ss.merge_components`) and **quantize**: each weight takes the mean of its most
#    responsible component (`ss.quantize`), so zero-component weights become exact zeros;
# 4. store the result as a codebook plus indices, counted the way Deep Compression (Han et al. 2016) does
#    (`ss.compression_report`: CSR with relative indices), and write it to disk (`ss.save_quantized`).
#
# We add a short fine-tuning that keeps the clusters (`ss.keep_clusters`) and compare with the usual post-training
# baseline, per-tensor k-means with 16 clusters (`ss.cluster_weights`), with and without magnitude pruning.
#
# Model and data: a 64-64-10 MLP on scikit-learn's 8×8 digits (8,832 kernel weights). Quick mode by default;
# `SOFTSHARE_FULL=1` trains longer and also sweeps the zero component's proportion.

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

# %%
import sys
sys.path.insert(0, os.path.abspath(".."))          # the repository root (a notebook runs from notebooks/)
from benchmarks import digits, training              # the shared digits task and training loop of the benchmarks

task = digits.DigitsTask.load(SEED)               # 1797 images of 8x8 pixels, standardized, 75/25 split; a 64-64-10 MLP
init_params = task.init(SEED)
kernel_weights = training.kernel_values              # all kernel weights in one flat array

print(f"digits: {len(task.data.x_train)} train / {len(task.data.x_test)} test images")

# %% [markdown]
# ## 1. Pretrain

# %%
EPOCHS_PRE = 60 if FULL else 30
EPOCHS_RE = 100 if FULL else 30
EPOCHS_FT = 20 if FULL else 10

pretrained = task.train(optax.adam(1e-3), init_params, EPOCHS_PRE).params
acc_pre = task.accuracy(pretrained)
print(f"pretrained: test accuracy {acc_pre:.4f}")

# %% [markdown]
# ## 2. Retrain with the mixture prior: the recipe
#
# The recipe of `ss.mixture_prior`'s docstring (measured in `benchmarks/recipe.py`): retrain the
# PRETRAINED network with 16 components plus a zero component of fixed proportion π_0, the mixture
# re-estimated by EM under Ullrich's Gamma hyper-priors (Gamma(250, 0.1) for the free components,
# Gamma(5000, 2) for the zero component; without them EM collapses components onto single weights), at
# strength 0.012 / N (N = 1347 images, a mean loss). π_0 sets how many weights end at zero, the knob
# between accuracy and size: on this 8.8k-weight MLP 0.99 gives 94.7 % at 16x after fine-tuning, 0.95
# gives 96.5 % at 8.9x, 0.9 keeps 97.0 % at 6.6x (`benchmarks/results/recipe.json`).

# %%
N = len(task.data.x_train)
STRENGTH, ZERO_WEIGHT = 0.012 / N, 0.99      # the recipe: ss.mixture_prior's docstring, benchmarks/recipe.py
GAMMA = dict(precision_prior=(250.0, 0.1), zero_precision_prior=(5000.0, 2.0))

def retrain(zero_weight=ZERO_WEIGHT, epochs=EPOCHS_RE):
    tx = optax.chain(ss.mixture_prior(16, STRENGTH, zero_weight=zero_weight, mixture_update="em", **GAMMA),
                     optax.adam(1e-3))
    run = task.train(tx, pretrained, epochs, seed=1)
    return run.params, run.state

retrained, state = retrain()
mixture = ss.get_mixture(state)
acc_re = task.accuracy(retrained)
print(f"retrained with the prior: test accuracy {acc_re:.4f}")

# %% [markdown]
# ## 3. Merge, quantize, report

# %%
merged = ss.merge_components(mixture, 1e-2)        # symmetric KL below 1e-2: merge
q = ss.quantize(retrained, merged)                  # MAP assignment: each weight -> its component's mean
acc_q = task.accuracy(ss.dequantize(q))
report = ss.compression_report(q, params=retrained, mixture=merged)
print(f"components: {mixture.num_components} learned, {merged.num_components} after merging")
print(f"quantized: test accuracy {acc_q:.4f}, compression {report.ratio:.1f}x (CSR, whole model incl. biases)")
print()
print(report)

# %%
import tempfile

with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "digits_mlp.safetensors")
    ss.save_quantized(path, q)
    file_bytes = os.path.getsize(path)
    loaded = ss.load_quantized(path, like=retrained)
dense_bytes = sum(np.asarray(w).nbytes for w in jax.tree.leaves(retrained))
print(f"file: {file_bytes} bytes (safetensors + JSON metadata) vs {dense_bytes} bytes of float32 params "
      f"({dense_bytes / file_bytes:.1f}x smaller)")
print(f"loaded back: test accuracy {task.accuracy(ss.dequantize(loaded)):.4f} (same as quantized: "
      f"{task.accuracy(ss.dequantize(loaded)) == acc_q})")

# %% [markdown]
# ## 4. Fine-tune with the clusters kept
#
# `ss.keep_clusters(q)` averages the gradient over each cluster and zeroes it for the zero cluster, so after any
# number of Adam steps the weights still take only the codebook's values (updated) and the zeros stay zero.

# %%
tuned = task.train(optax.chain(ss.keep_clusters(q), optax.adam(1e-3)), ss.dequantize(q), EPOCHS_FT, seed=2).params
acc_ft = task.accuracy(tuned)
q_ft = ss.quantize(tuned, None)                     # lossless: its distinct values are the codebook
# The shared values may move past each other, which reorders a sorted codebook: compare the partitions.
def kept(a, b):
    old, new = np.asarray(a.unpacked()), np.asarray(b.unpacked())
    return all(np.unique(new[old == c]).size == 1 for c in np.unique(old))
same = all(kept(a, b) for (_, a), (_, b) in zip(q.leaves_with_paths(), q_ft.leaves_with_paths())
           if hasattr(a, "codebook"))
print(f"fine-tuned {EPOCHS_FT} epochs: test accuracy {acc_ft:.4f}; every cluster still one value: {same}; "
      f"compression {ss.compression_report(q_ft).ratio:.1f}x")

# %% [markdown]
# ## 5. Baseline: k-means clustering of the pretrained weights
#
# Per-tensor k-means with 16 clusters (what TensorFlow Model Optimization and Core ML palettization do), without
# and with magnitude pruning of half of each tensor first (zero is then one of the 16 entries).

# %%
rows = [("pretrained, float32", acc_pre, 1.0),
        ("retrained with mixture prior", acc_re, 1.0),
        ("quantized (merged mixture, MAP)", acc_q, report.ratio),
        (f"+ keep_clusters fine-tune ({EPOCHS_FT} ep)", acc_ft, ss.compression_report(q_ft).ratio)]
for prune in (0.0, 0.5):
    c = ss.cluster_weights(pretrained, 16, key=jax.random.key(SEED), prune_fraction=prune)
    rows.append((f"k-means 16, pruned {prune:.0%}", task.accuracy(ss.dequantize(c)), ss.compression_report(c).ratio))
print(f"{'model':<40} {'test acc':>8} {'CSR ratio':>10}")
for name, a, r in rows:
    print(f"{name:<40} {a:>8.4f} {r:>9.1f}x")
soft, kmeans = rows[3], rows[-1]
print(f"\nsoft weight sharing + fine-tune vs k-means with pruning: "
      f"{soft[2] / kmeans[2]:.2f}x the compression ratio, accuracy {soft[1] - kmeans[1]:+.4f}")

# %% [markdown]
# ## 6. The weights before and after
#
# Left: each kernel weight after retraining against its pretrained value (Ullrich et al.'s Figure 2), colored by
# the merged component it is quantized to; horizontal bands are the shared values, the band at 0 the pruned
# weights. Right: the retrained weights' histogram with the learned mixture density.

# %%
w_pre, w_re = kernel_weights(pretrained), kernel_weights(retrained)
w_q = kernel_weights(ss.dequantize(q))
codebook, assignment = np.unique(w_q, return_inverse=True)

fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
axes[0].scatter(w_pre, w_re, c=assignment, cmap="tab20", s=3, alpha=0.6)
lim = np.abs(np.r_[w_pre, w_re]).max() * 1.05
axes[0].plot([-lim, lim], [-lim, lim], "k--", lw=0.6)
for v in codebook:
    axes[0].axhline(v, color="grey", lw=0.3)
axes[0].set(xlabel="pretrained weight", ylabel="retrained weight", xlim=(-lim, lim), ylim=(-lim, lim),
            title=f"{len(w_re)} kernel weights, {len(codebook)} shared values after quantization")

grid = np.linspace(-lim, lim, 2000)
density = np.exp(np.asarray(ss.mixture_log_prob(merged, jnp.asarray(grid, jnp.float32))))
axes[1].hist(w_pre, bins=150, density=True, alpha=0.35, label="pretrained")
axes[1].hist(w_re, bins=150, density=True, alpha=0.5, label="retrained")
axes[1].plot(grid, density, color="C3", lw=1.0, label="merged mixture")
axes[1].set_yscale("log"); axes[1].set_ylim(1e-2, None)
axes[1].set(xlabel="weight", ylabel="density (log scale)", title="weight distribution")
axes[1].legend()
plt.tight_layout()
plt.show()

# %%
fig, ax = plt.subplots(figsize=(9, 4))
for i, (name, a, r) in enumerate(rows):
    ax.scatter(r, a, s=50, label=name, color=f"C{i}")
ax.set(xlabel="compression ratio (CSR)", ylabel="test accuracy", title="accuracy vs size")
ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
plt.tight_layout()
plt.show()

# %% [markdown]
# ### Full mode: the zero component's proportion
#
# In full mode (`SOFTSHARE_FULL=1`) the retraining is repeated for several $\pi_0$: more weight on the zero
# component gives more zeros (a smaller model) and, past some point, lower accuracy.

# %%
if FULL:
    sweep = []
    for pi0 in (0.5, 0.8, 0.9, 0.95, 0.99):
        p, s = retrain(pi0)
        qq = ss.quantize(p, ss.merge_components(ss.get_mixture(s), 1e-2))
        sweep.append((pi0, task.accuracy(ss.dequantize(qq)), ss.compression_report(qq).ratio))
        print(f"pi_0 = {pi0}: quantized test accuracy {sweep[-1][1]:.4f}, compression {sweep[-1][2]:.1f}x")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r for _, _, r in sweep], [a for _, a, _ in sweep], "o-")
    for pi0, a, r in sweep:
        ax.annotate(f"$\\pi_0$={pi0}", (r, a), fontsize=8)
    ax.set(xlabel="compression ratio", ylabel="quantized test accuracy", title="trade-off over $\\pi_0$")
    plt.show()
else:
    print("quick mode: sweep skipped (set SOFTSHARE_FULL=1)")

# %% [markdown]
# ## What the output shows
#
# * The table in section 5 lists the test accuracy and the CSR compression ratio of each stage. Retraining with the
#   prior moves the weights onto the components (the horizontal bands of the scatter plot, the spikes of the
#   histogram), so the quantization step that follows changes the accuracy little, while most of the model's
#   size goes away: a large share of the weights sit exactly at zero and the rest need 4-bit indices.
# * `keep_clusters` fine-tuning keeps the cluster assignment (printed `True`) and therefore the same size.
# * The saved file is a few times smaller than the float32 parameters (printed); the CSR count is the
#   Deep Compression accounting, not a file format.
# * k-means with 16 clusters keeps most of the pretrained accuracy but only compresses by the index width
#   (4-bit indices plus the CSR overheads); pruning half of each tensor first buys size with accuracy.
#   The last printed line compares soft weight sharing with pruned k-means directly: in soft weight sharing
#   the prior decides *during training* which weights go to zero and which values the others share, instead of
#   rounding a network that was never asked to tolerate it.
# * On this tiny model (biases and a 64-input first layer count for a lot) the ratios are far below Ullrich et
#   al.'s LeNet numbers; the stages and their order are what carries over.
