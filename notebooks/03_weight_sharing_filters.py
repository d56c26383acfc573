# %% [markdown]
# # Weight-sharing regularization on shuffled inputs (Shakerinava et al. 2024)
#
# *Weight-sharing regularization* (Shakerinava, Sohrabi, Ravanbakhsh & Lacoste-Julien, AISTATS 2024) argues that
# the regularizer $R(w) = \frac{1}{d-1}\sum_{i>j}|w_i - w_j|$, applied with its exact proximal map, lets a fully
# connected layer discover structure that a convolution would have built in. Their test: **permute the input
# positions** with a fixed random permutation. A CNN, which relies on the order, is lost; a fully connected (FC)
# network does not care about the order — and with the regularizer it can still learn filters that are
# *local in the original order*.
#
# Here, in a small version of that experiment:
#
# * data: MNIST-1D (Greydanus 2020), generated with `mnist1d.data.make_dataset` (nothing is downloaded):
#   40-sample 1-D signals of 10 classes, shifted, scaled and noisy templates;
# * the 40 input positions are permuted with one fixed permutation;
# * model: an FC network 40 → 128 → 128 → 10 (ReLU), SGD with momentum;
# * the first layer is trained with and without `ss.weight_sharing_prox(..., axis=0)`: `axis=0` on the
#   `(in, out)` kernel makes each neuron's 40 incoming weights one group; an optional ℓ1 term (`l1=`) also pulls
#   shared values to exactly 0;
# * we map the first-layer filters back to the original order and look at them.
#
# Quick mode (default): 3000 generated samples, 40 epochs, one seed. `SOFTSHARE_FULL=1`: the package's default
# 5000 samples, more epochs, three seeds.

# %%
# %matplotlib inline
import os, time, warnings
import numpy as np
import jax
import flax.linen as nn
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
from benchmarks import datasets, training                # the data loaders and training loop of the benchmarks

data = datasets.load_mnist1d(5000 if FULL else 3000)  # the generator's defaults and seed; 80/20 train/test split
D = data.x_train.shape[1]
perm = datasets.permutation(D, seed=1000)             # the fixed permutation of the 40 positions
mean, std = data.x_train.mean(0), data.x_train.std(0)
x_tr, x_te = (datasets.permute((x - mean) / std, perm) for x in (data.x_train, data.x_test))
y_tr, y_te = data.y_train, data.y_test
print(f"MNIST-1D: {len(x_tr)} train / {len(x_te)} test, {D} positions, permuted")

fig, axes = plt.subplots(1, 2, figsize=(11, 2.8))
for c in range(4):
    i = int(np.flatnonzero(y_tr == c)[0])
    axes[0].plot(datasets.unpermute(x_tr[i], perm), label=f"class {c}")
    axes[1].plot(x_tr[i], label=f"class {c}")
axes[0].set(title="original order", xlabel="position"); axes[1].set(title="what the network sees (permuted)", xlabel="input index")
axes[0].legend(fontsize=7, ncol=2)
plt.tight_layout(); plt.show()


# %%
class FC(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(128, name="first")(x))
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(10)(x)

model = FC()
first_kernel = lambda params: jax.tree_util.tree_map_with_path(
    lambda path, _: path[0].key == "first" and path[-1].key == "kernel", params)
EPOCHS, LR, BATCH = (80 if FULL else 40), 0.05, 100

loss, predict = training.cross_entropy(training.flax_apply(model)), training.predictor(training.flax_apply(model))

def filters(params):
    """First-layer filters in the ORIGINAL order: (40 positions, 128 neurons)."""
    return datasets.unpermute(np.asarray(params["first"]["kernel"]), perm)

def locality(F, window=9):
    """Share of a filter's mass |w| inside its best circular window of `window` positions (mean over non-zero filters)."""
    mass = np.abs(F)
    total = mass.sum(0)
    best = sum(np.roll(mass, -s, axis=0) for s in range(window)).max(0)
    alive = total > 0
    return float((best[alive] / total[alive]).mean())


# %%
def optimizer(**prox):                             # SGD with momentum, then (given a strength) the prox, LAST
    return training.sgd_prox(LR, 0.9, axis=0, mask=first_kernel, **prox)

METHODS = {"FC": dict(), "FC + prox": dict(strength=0.03), "FC + prox + l1": dict(strength=0.03, l1=0.003)}
SEEDS = [0, 1, 2] if FULL else [0]

results, trained = {}, {}
for name, kw in METHODS.items():
    start = time.perf_counter()
    for seed in SEEDS:
        p = training.train(loss, optimizer(**kw), training.init_flax(model, D, seed), x_tr, y_tr, EPOCHS,
                         batch=BATCH, shuffle=jax.random.key(seed + 1)).params   # one jitted lax.scan per epoch
        F = filters(p)
        per_neuron = [len(np.unique(F[:, j])) for j in range(F.shape[1])]
        results.setdefault(name, []).append(dict(
            acc=training.accuracy(predict, p, x_te, y_te), distinct=ss.sharing_stats(p["first"]["kernel"]).total.distinct / F.size,
            per_neuron=float(np.median(per_neuron)), zeros=float(np.mean(F == 0)),
            dead=int(np.sum(np.abs(F).sum(0) == 0)), locality=locality(F)))
        if seed == SEEDS[0]:
            trained[name] = p
    print(f"{name:<15} {kw}  ({time.perf_counter() - start:.0f} s)")

print(f"\n{'model':<15} {'test acc':>9} {'distinct frac':>13} {'distinct/neuron':>15} {'zero frac':>9} "
      f"{'zero filters':>12} {'locality':>8}")
for name, rs in results.items():
    m = {k: np.mean([r[k] for r in rs]) for k in rs[0]}
    print(f"{name:<15} {m['acc']:>9.3f} {m['distinct']:>13.3f} {m['per_neuron']:>15.1f} {m['zeros']:>9.3f} "
          f"{m['dead']:>12.1f} {m['locality']:>8.3f}")
print(f"\n(mean over {len(SEEDS)} seed(s); locality of a uniform filter: {9 / D:.3f}; "
      "distinct/neuron: median over the 128 neurons of the distinct incoming weights, of 40)")

# %% [markdown]
# ## The first-layer filters, mapped back to the original order
#
# Top: the 6 most local filters of each model (highest locality score; the same rule for all three), over the
# original positions. The table above gives the mean over all filters.
# Bottom: all 128 filters as a heatmap (rows: neurons, sorted by the centre of their best 9-position window;
# columns: original positions).

# %%
fig, axes = plt.subplots(len(trained), 6, figsize=(15, 2.1 * len(trained)), sharex=True)
for row, (name, p) in enumerate(trained.items()):
    F = filters(p)
    scores = [locality(F[:, [j]]) if np.any(F[:, j]) else 0.0 for j in range(F.shape[1])]
    for ax, j in zip(axes[row], np.argsort(scores)[::-1][:6]):          # the 6 most local filters
        ax.bar(np.arange(D), F[:, j], width=0.8, color=f"C{row}")
        ax.set_title(f"{name}: neuron {j}, locality {locality(F[:, [j]]):.2f}", fontsize=8)
        ax.tick_params(labelsize=7)
for ax in axes[-1]:
    ax.set_xlabel("original position", fontsize=8)
plt.tight_layout(); plt.show()

fig, axes = plt.subplots(1, len(trained), figsize=(14, 4.5))
for ax, (name, p) in zip(axes, trained.items()):
    F = filters(p)
    mass = np.abs(F)
    centre = (sum(np.roll(mass, -s, axis=0) for s in range(9)).argmax(0) + 4) % D
    order = np.lexsort((centre, mass.sum(0) == 0))   # dead filters last
    lim = np.quantile(np.abs(F), 0.99)
    ax.imshow(F[:, order].T, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set(title=name, xlabel="original position", ylabel="neuron (sorted by window centre)")
    ax.grid(False)
plt.tight_layout(); plt.show()

# %% [markdown]
# ## What the output shows
#
# * **Distinct values and zeros**: the table prints, for each model, the fraction of distinct values in the
#   first-layer kernel and the median number of distinct incoming weights per neuron. Plain FC has every weight
#   distinct; the prox merges each neuron's weights into shared values, and with the ℓ1 term a large fraction of
#   them become exactly zero (some filters entirely).
# * **Locality**: the prox + ℓ1 filters, mapped back to the original order, concentrate more of their mass in a
#   contiguous window than the plain FC filters (printed *locality*; a uniform filter scores 9/40), even though
#   the network only ever saw permuted inputs. In the heatmap of the prox + ℓ1 model the non-zero weights
#   gather near the diagonal (each neuron looks at a stretch of the signal) and many neurons are switched off
#   entirely; the plain FC filters spread over all positions. The bar plots show the most local filters of each
#   model: with the prox they are short bumps or single spikes (some of them nearly switched off, note the
#   scales), while plain FC's most local filters still cover the whole signal. The locality is partial in this short run:
#   the filters are far from the clean, contiguous kernels of a CNN.
# * **Accuracy**: the printed test accuracies compare the three models on the same data, initialization and data
#   order. In quick mode this is one seed on a small dataset, so small differences are within noise; the
#   effect of the regularizer on accuracy is better judged with `SOFTSHARE_FULL=1` (three seeds) or with the
#   repository's `benchmarks/shuffled_filters.py`.
# * **Per neuron or per layer**: this notebook groups each neuron's incoming weights (`axis=0`), which makes
#   every filter's sharing easy to read. The benchmark script instead groups the whole first layer
#   (`axis=None`, as the paper's code does: values are shared across neurons too) with a smaller strength and a
#   cosine-decayed learning rate over 200 epochs; that is the setting in which, there, FC + prox beat plain FC
#   on permuted MNIST-1D by about 5 points (3 seeds; see its JSON and `04_speed`).
