# %% [markdown]
# # Flax NNX quickstart: train with the prior, compress, reload, fine-tune
#
# The whole soft weight-sharing workflow (Ullrich, Meeds & Welling 2017) on a Flax NNX model, with the usual
# `nnx.Optimizer(model, tx, wrt=nnx.Param)` and no conversion of the parameters anywhere:
#
# 1. pretrain a small CNN with Adam;
# 2. retrain it with `ss.mixture_prior` in front of Adam;
# 3. merge the mixture's close components and quantize `nnx.state(model, nnx.Param)` directly;
# 4. read the size report, save the file, load it back **in a fresh process** and check the accuracy;
# 5. fine-tune with `ss.keep_clusters(q)`, which keeps every weight on its cluster and the zeros at zero.
#
# Every softshare_jax function that takes a params tree takes an `nnx.State` as it takes a dict. Leaves are
# named by their path without the Variable's trailing `value` (`conv1/kernel`), so a file saved from an
# `nnx.State` and one saved from its `nnx.to_pure_dict` are the same file.
#
# Data: scikit-learn's 8×8 digits (bundled, nothing is downloaded). Quick mode by default;
# `SOFTSHARE_FULL=1` trains longer.

# %%
import os, shutil, subprocess, sys, tempfile, textwrap, warnings
import numpy as np
import jax, jax.numpy as jnp
import optax
from flax import nnx
import softshare_jax as ss

warnings.filterwarnings("ignore")
FULL = os.environ.get("SOFTSHARE_FULL", "0") == "1"   # quick mode by default
SEED = 0
print(f"mode: {'full' if FULL else 'quick'}, JAX backend: {jax.default_backend()}")

sys.path.insert(0, os.path.abspath(".."))          # the repository root (a notebook runs from notebooks/)
from benchmarks import datasets                        # the digits split the other notebooks use

data = datasets.load_digits(SEED)                      # standardized 8x8 images, 75/25 stratified split
x_train, x_test = (np.asarray(x).reshape(-1, 8, 8, 1) for x in (data.x_train, data.x_test))
y_train, y_test = data.y_train, data.y_test
print(f"digits: {len(x_train)} train / {len(x_test)} test images")

# %% [markdown]
# ## The model
#
# Two 3×3 convolutions and a linear classifier. Its code is kept as text so that the fresh process of
# section 4 can define the same class (in a project it would live in a module that both import).

# %%
MODEL_CODE = '''
import jax, numpy as np
from flax import nnx

class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 16, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(jax.nn.relu(self.conv1(x)), (2, 2), strides=(2, 2))
        x = jax.nn.relu(self.conv2(x))
        return self.head(x.reshape(x.shape[0], -1))

def accuracy(model, x, y):
    return float(np.mean(np.asarray(nnx.jit(lambda m, x: m(x).argmax(-1))(model, x)) == y))
'''
exec(MODEL_CODE)

model = CNN(nnx.Rngs(SEED))
params = nnx.state(model, nnx.Param)
print(ss.sharing_stats(params))                    # paths without "value": conv1/kernel, ...

# %% [markdown]
# ## 1. Pretrain
#
# A standard NNX loop: `nnx.Optimizer` hands the transforms the updates, and `optimizer.update` applies them.

# %%
BATCH = 64
EPOCHS_PRE = 60 if FULL else 30
EPOCHS_RE = 60 if FULL else 30
EPOCHS_FT = 20 if FULL else 10


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def train(model, tx, epochs, seed):
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    steps = len(x_train) // BATCH
    for _ in range(epochs):
        for idx in rng.permutation(len(x_train))[: steps * BATCH].reshape(steps, BATCH):
            train_step(model, optimizer, x_train[idx], y_train[idx])
    return optimizer


train(model, optax.adam(1e-3), EPOCHS_PRE, seed=1)
acc_pre = accuracy(model, x_test, y_test)
print(f"pretrained: test accuracy {acc_pre:.4f}")

# %% [markdown]
# ## 2. Retrain with the mixture prior
#
# The recipe of `ss.mixture_prior`'s docstring (notebook 02 explains it): 16 components and a zero component
# of fixed proportion $\pi_0$, the mixture updated by EM under Gamma hyper-priors on the precisions, strength
# 0.012 / N. Here $\pi_0 = 0.95$, the recipe's middle setting between size and accuracy.
# `ss.mixture_prior` goes *before* Adam; its state lives in `optimizer.opt_state`.

# %%
N = len(data.x_train)
STRENGTH, ZERO_WEIGHT = 0.012 / N, 0.95
GAMMA = dict(precision_prior=(250.0, 0.1), zero_precision_prior=(5000.0, 2.0))

prior = ss.mixture_prior(16, STRENGTH, zero_weight=ZERO_WEIGHT, mixture_update="em", **GAMMA)
optimizer = train(model, optax.chain(prior, optax.adam(1e-3)), EPOCHS_RE, seed=2)
acc_re = accuracy(model, x_test, y_test)
mixture = ss.get_mixture(optimizer.opt_state)
print(f"retrained with the prior: test accuracy {acc_re:.4f}")

# %% [markdown]
# ## 3. Merge, quantize, report
#
# `ss.quantize` takes the model's `nnx.State` as it is and gives back a `ss.Quantized` with the same
# structure; `ss.dequantize` of it is a state that `nnx.update` writes into the model.

# %%
merged = ss.merge_components(mixture, 1e-2)        # symmetric KL below 1e-2: merge
q = ss.quantize(nnx.state(model, nnx.Param), merged)
nnx.update(model, ss.dequantize(q))
acc_q = accuracy(model, x_test, y_test)
report = ss.compression_report(q)
print(f"components: {mixture.num_components} learned, {merged.num_components} after merging")
print(f"quantized: test accuracy {acc_q:.4f}, compression {report.ratio:.1f}x (CSR, whole model incl. biases)")
print()
print(report)

# %% [markdown]
# ## 4. Save, and load in a fresh process
#
# The file holds codebooks, packed indices and the kept biases, with a checksum. A new Python process that
# knows only the model's code builds the model (any weights), loads the file with `like=` its state, and
# writes the weights into it.

# %%
tmp = tempfile.mkdtemp()
path = os.path.join(tmp, "digits_cnn.safetensors")
ss.save_quantized(path, q)
np.savez(os.path.join(tmp, "test.npz"), x=x_test, y=y_test)
dense_bytes = sum(np.asarray(w).nbytes for w in jax.tree.leaves(nnx.state(model, nnx.Param)))
print(f"file: {os.path.getsize(path)} bytes vs {dense_bytes} bytes of float32 params")

reload = MODEL_CODE + textwrap.dedent(f'''
    import softshare_jax as ss
    model = CNN(nnx.Rngs(123))                      # random weights: the file replaces them all
    q = ss.load_quantized({path!r}, like=nnx.state(model, nnx.Param))
    nnx.update(model, ss.dequantize(q))
    test = np.load({os.path.join(tmp, "test.npz")!r})
    print(repr(accuracy(model, test["x"], test["y"])))
''')
child = subprocess.run([sys.executable, "-c", reload], capture_output=True, text=True)
shutil.rmtree(tmp)
assert child.returncode == 0, child.stderr
acc_child = float(child.stdout.strip().splitlines()[-1])
print(f"fresh process: test accuracy {acc_child:.4f}; equal to this process's {acc_q:.4f}: {acc_child == acc_q}")
assert acc_child == acc_q

# %% [markdown]
# ## 5. Fine-tune with the clusters kept
#
# `ss.keep_clusters(q)` goes before Adam in an `nnx.Optimizer` on the model, as any transform. Each cluster's
# weights get one shared update and the zero cluster none, so the model stays exactly as compressible: the
# shared values move, the assignment does not.

# %%
train(model, optax.chain(ss.keep_clusters(q), optax.adam(1e-3)), EPOCHS_FT, seed=3)
acc_ft = accuracy(model, x_test, y_test)
q_ft = ss.quantize(nnx.state(model, nnx.Param), None)   # lossless: the weights already share values


def quantized_leaves(q):
    return {path: leaf for path, leaf in q.leaves_with_paths() if isinstance(leaf, ss.QuantizedLeaf)}


before, after = quantized_leaves(q), quantized_leaves(q_ft)
# The same partition: each old cluster is exactly one new cluster (shared values may move past each other).
same = all(len(set(zip(np.asarray(before[p].unpacked()), np.asarray(after[p].unpacked()))))
           == before[p].codebook.size == after[p].codebook.size for p in before)
zeros_kept = all(np.all(np.asarray(after[p].values())[np.asarray(before[p].values()) == 0] == 0) for p in before)
print(f"fine-tuned {EPOCHS_FT} epochs: test accuracy {acc_ft:.4f}; same clusters: {same}; zeros kept: "
      f"{zeros_kept}; compression {ss.compression_report(q_ft).ratio:.1f}x")
assert same and zeros_kept
print()
print(ss.sharing_stats(nnx.state(model, nnx.Param)))

# %%
print(f"{'stage':<32} {'test acc':>8} {'CSR ratio':>10}")
for name, acc, ratio in [("pretrained, float32", acc_pre, 1.0), ("retrained with the prior", acc_re, 1.0),
                         ("quantized (merged mixture, MAP)", acc_q, report.ratio),
                         ("reloaded in a fresh process", acc_child, report.ratio),
                         (f"+ keep_clusters ({EPOCHS_FT} epochs)", acc_ft, ss.compression_report(q_ft).ratio)]:
    print(f"{name:<32} {acc:>8.4f} {ratio:>9.1f}x")

# %% [markdown]
# ## What the output shows
#
# * The NNX state goes into `ss.quantize`, `ss.compression_report`, `ss.save_quantized` and
#   `ss.keep_clusters` as it is; the report names the leaves `conv1/kernel`, ..., as it would for a dict.
# * The fresh process gets exactly the accuracy of the quantized model here: the file is all it needs besides the
#   model's code.
# * Fine-tuning with `keep_clusters` keeps the clusters and the zeros (printed `True`), so the compression ratio is
#   unchanged while the shared values adapt.
# * The ratios are those of a tiny model whose biases and first layer weigh a lot; notebook 02 compares with
#   k-means and explains the settings.
