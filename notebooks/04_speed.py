# %% [markdown]
# # Benchmarks: speed, memory, tying and the reproductions
#
# This notebook only reads the JSON files that the benchmark scripts in `benchmarks/` committed to
# `benchmarks/results/` and plots them; nothing is timed here. Files:
#
# * `prox_speed_{cpu,gpu}.json` — `ss.prox_weight_sharing` on one group of d weights (d up to $10^7$),
#   its `"host"` (the C kernel on the host), `"device"` (pure JAX) and `"auto"` methods, against a NumPy/SciPy
#   float64 pipeline (sort + isotonic regression) and plain sorting, on four inputs;
# * `prior_overhead_{cpu,gpu}.json` — the cost of one Adam step with `ss.mixture_prior` against Adam alone and a
#   naive (unchunked) implementation, time and extra memory;
# * `tying.json` — two related regression tasks trained separately, soft-tied (`ss.soft_tie`) or hard-tied
#   (`ss.hard_tie`);
# * optionally `shift_detection.json` (Nowlan & Hinton 1992's shift-detection experiment),
#   `shuffled_filters.json` (Shakerinava et al. 2024) and `compress_mnist.json`, when present;
# * `scale.json` — every transform's step from $10^5$ to $10^8$ params on 1 and 8 devices, and compression at
#   model size (`benchmarks/scale.py`), when present.

# %%
# %matplotlib inline
import json, os
import numpy as np
import matplotlib.pyplot as plt

plt.rcParams.update({"figure.dpi": 90, "axes.grid": True, "grid.alpha": 0.3})

root = os.path.abspath(os.getcwd())                # nbmake runs a notebook from its own folder
while not os.path.exists(os.path.join(root, "pyproject.toml")) and os.path.dirname(root) != root:
    root = os.path.dirname(root)
RESULTS = os.path.join(root, "benchmarks", "results")

def load(name):
    path = os.path.join(RESULTS, name)
    return json.load(open(path)) if os.path.exists(path) else None

def describe(r):
    m = r["machine"]
    device = m["jax_devices"][0]["device_kind"] if m.get("jax_devices") else r["backend"]
    return f"{r['backend']}: {device if r['backend'] != 'cpu' else m.get('cpu_model', 'cpu')} ({m.get('cpus_usable', '?')} CPUs), jax {r['versions'].get('jax')}"

for name in sorted(os.listdir(RESULTS)):
    if name.endswith(".json"):
        r = load(name)
        print(f"{name:<26} {r.get('created_utc', '')[:10]}  {describe(r)}")

# %% [markdown]
# ## 1. The prox: time per call against the group size
#
# Median time of one call (jitted, compiled ahead of time) for a single group of d weights. The four inputs:
# *gaussian* (weights ~ N(0, 0.05²), small strength: few merges), *collapse* (huge strength: everything merges),
# *chain* (an adversarial input for the pooling: one long chain of merges) and *ties* (many exactly equal values).

# %%
prox = {b: load(f"prox_speed_{b}.json") for b in ("cpu", "gpu")}
prox = {b: r for b, r in prox.items() if r}
inputs = ["gaussian", "collapse", "chain", "ties"]
styles = {"pipeline": ("k", "--"), "np.sort": ("grey", ":"), "jnp.sort": ("grey", "-."),
          "host": ("C0", "-"), "device": ("C1", "-"), "auto": ("C2", "")}

fig, axes = plt.subplots(len(prox), len(inputs), figsize=(15, 3.6 * len(prox)), squeeze=False, sharex=True)
for row, (backend, r) in enumerate(prox.items()):
    for col, inp in enumerate(inputs):
        ax = axes[row, col]
        for method, (color, ls) in styles.items():
            pts = sorted((x["d"], x["median_ms"]) for x in r["rows"]
                         if x["input"] == inp and x["method"] == method and not x.get("skipped") and x.get("median_ms"))
            if pts:
                d, ms = zip(*pts)
                ax.plot(d, ms, color=color, ls=ls or "none", marker="o" if method == "auto" else ".",
                        mfc="none" if method == "auto" else color, label=method)
        ax.set(xscale="log", yscale="log", title=f"{backend.upper()}: {inp}")
        if col == 0:
            ax.set_ylabel("median ms per call")
        if row == len(prox) - 1:
            ax.set_xlabel("d (weights in the group)")
axes[0, 0].legend(fontsize=8)
plt.tight_layout(); plt.show()

# %%
for backend, r in prox.items():
    d_max = max(x["d"] for x in r["rows"])
    print(f"{backend.upper()}, d = {d_max:,}: median ms (ratio to the NumPy/SciPy pipeline)")
    for inp in inputs:
        cells = []
        for method in ("pipeline", "host", "device", "auto"):
            x = next((x for x in r["rows"] if x["input"] == inp and x["method"] == method and x["d"] == d_max), None)
            if x is None or x.get("skipped") or not x.get("median_ms"):
                cells.append(f"{method} skipped")
            else:
                cells.append(f"{method} {x['median_ms']:.1f}" + ("" if method == "pipeline" else f" ({x['ratio_to_pipeline']:.2f}x)"))
        print(f"  {inp:<9} " + ", ".join(cells))

# %% [markdown]
# ## 2. Overhead of the mixture prior
#
# One optimizer step on n weights: `adam` alone, `prior` (`ss.mixture_prior` chained before Adam) and `naive` (the
# same math written directly, which materializes an n × K array). Left: time; right: the extra peak memory
# relative to the parameters' size.

# %%
prior = {b: load(f"prior_overhead_{b}.json") for b in ("cpu", "gpu")}
prior = {b: r for b, r in prior.items() if r}
variants = ["adam", "prior", "naive"]

fig, axes = plt.subplots(len(prior), 2, figsize=(13, 3.6 * len(prior)), squeeze=False)
for row, (backend, r) in enumerate(prior.items()):
    configs = sorted({(x["n"], x["components"]) for x in r["rows"]})
    pos = np.arange(len(configs))
    for i, v in enumerate(variants):
        get = {(x["n"], x["components"]): x for x in r["rows"] if x["variant"] == v}
        axes[row, 0].bar(pos + (i - 1) * 0.27, [get[c]["median_ms"] for c in configs], 0.27, label=v)
        axes[row, 1].bar(pos + (i - 1) * 0.27, [get[c]["extra_peak_over_params"] for c in configs], 0.27, label=v)
    labels = [f"n={n:.0e}\nK={k}" for n, k in configs]
    axes[row, 0].set(yscale="log", ylabel="median ms per step", title=f"{backend.upper()}: time per step")
    axes[row, 1].set(ylabel="extra peak memory / params", title=f"{backend.upper()}: memory")
    for ax in axes[row]:
        ax.set_xticks(pos, labels)
axes[0, 0].legend()
plt.tight_layout(); plt.show()

for backend, r in prior.items():
    for x in r["rows"]:
        if x["variant"] == "prior":
            print(f"{backend.upper()} n={x['n']:>8} K={x['components']:>2}: prior step {x['median_ms']:8.2f} ms = "
                  f"{x['ratio_to_adam']:5.1f}x Adam alone, {x['ratio_to_naive']:.2f}x the naive version")

# %% [markdown]
# ## 3. Tying two related tasks
#
# Two regression tasks whose teachers differ by a relatedness δ (small δ: nearly the same task), each with its own
# small network; the first layers are trained separately, soft-tied with increasing strength, or hard-tied.
# Mean test loss (both tasks) ± std over seeds.

# %%
tying = load("tying.json")
if tying:
    deltas = list(tying["summary_by_delta"])
    methods = list(tying["summary_by_delta"][deltas[0]])
    fig, axes = plt.subplots(1, len(deltas), figsize=(6 * len(deltas), 3.8), squeeze=False)
    for ax, delta in zip(axes[0], deltas):
        s = tying["summary_by_delta"][delta]
        means = [s[m]["test_loss_both"]["mean"] for m in methods]
        stds = [s[m]["test_loss_both"]["std"] for m in methods]
        ax.bar(methods, means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(methods))])
        ax.set(title=f"relatedness δ = {delta} ({s[methods[0]]['test_loss_both']['n']} seeds)", ylabel="test MSE (both tasks)")
        ax.tick_params(axis="x", rotation=20)
        best = methods[int(np.argmin(means))]
        print(f"δ = {delta}: " + ", ".join(f"{m} {v:.3f}" for m, v in zip(methods, means)) + f"  -> lowest: {best}")
    plt.tight_layout(); plt.show()

# %% [markdown]
# ## 4. Reproductions (when their results exist)

# %%
shift = load("shift_detection.json")
if shift:
    s = shift["summary"]
    names = list(s)
    ours = [s[n]["test_pct"]["mean"] for n in names]
    ours_std = [s[n]["test_pct"]["std"] for n in names]
    paper = [s[n].get("paper_test_pct", {}).get("mean", np.nan) for n in names]
    paper_std = [s[n].get("paper_test_pct", {}).get("std", 0) for n in names]
    pos = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.bar(pos - 0.2, ours, 0.4, yerr=ours_std, capsize=3, label="this package")
    ax.bar(pos + 0.2, paper, 0.4, yerr=paper_std, capsize=3, label="Nowlan & Hinton (1992)")
    ax.set_xticks(pos, names)
    ax.set(ylabel="test accuracy %", ylim=(50, 100), title="shift detection (20-10-1 network, 100 training patterns)")
    ax.legend(loc="lower right")
    plt.tight_layout(); plt.show()
    for n, a, sd, p in zip(names, ours, ours_std, paper):
        print(f"{n:<20} {a:5.1f} ± {sd:4.1f} %   paper {p:5.1f} %")
else:
    print("shift_detection.json not found")

# %%
shuffled = load("shuffled_filters.json")
if shuffled and isinstance(shuffled.get("summary"), dict):
    summary = shuffled["summary"]
    fig, axes = plt.subplots(1, len(summary), figsize=(6.5 * len(summary), 3.8), squeeze=False)
    for ax, (dataset, by) in zip(axes[0], summary.items()):
        names = list(by)
        acc = [100 * by[m]["test_acc"]["mean"] for m in names]
        err = [100 * by[m]["test_acc"]["std"] for m in names]
        ax.bar(names, acc, yerr=err, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.set(title=f"{dataset} ({shuffled['settings'].get('mode', '')} mode)", ylabel="test accuracy %",
               ylim=(max(0, min(acc) - 15), 100))
        ax.tick_params(axis="x", rotation=20)
        for m in names:
            loc = by[m].get("locality", {}).get("mean", float("nan"))
            print(f"{dataset:<8} {m:<16} test {100 * by[m]['test_acc']['mean']:5.1f} %  locality {loc:.3f}")
    plt.tight_layout(); plt.show()
else:
    print("shuffled_filters.json not found (or not in the expected format)")

# %%
compress = load("compress_mnist.json")
if compress:
    methods = [("baseline", "uncompressed"), ("soft_weight_sharing", "soft weight-sharing"),
               ("soft_weight_sharing_finetuned", "+ keep_clusters"), ("kmeans", "k-means 16")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for model, res in compress["results"].items():
        s = res["summary"]
        for key, label in methods:
            err, ratio = s[key]["error"]["mean"], s[key]["ratio"]["mean"]
            print(f"{model:<14} {label:<20} error {err:5.2f} %   CSR ratio {ratio:6.1f}x")
        xs = [s[k]["ratio"]["mean"] for k, _ in methods]
        ys = [s[k]["error"]["mean"] for k, _ in methods]
        ax.plot(xs, ys, "o", label=model)
        for x, y, (_, label) in zip(xs, ys, methods):
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="compression ratio (CSR, Deep Compression accounting)",
           ylabel="test error %", title="Ullrich et al. on 4000 MNIST images")
    ax.legend(); plt.tight_layout(); plt.show()
else:
    print("compress_mnist.json not found")

# %% [markdown]
# ## 5. Scale (`benchmarks/scale.py`)
#
# One jitted training step per transform, from $10^5$ to $10^8$ params, on one device and FSDP-sharded over
# eight (each kernel split along its columns), and the compression pipeline at $3.4 \times 10^7$ weights.
# Left: step time over Adam alone's on the same params. Right: the compiled step's temporary bytes per device
# over the device's own param bytes (the goal is at most 4, the grey line). On a CPU host the eight devices
# share its cores, so the 8-device times show the cost of the collectives, not a speed-up.

# %%
scale = load("scale.json")
if scale and scale.get("steps"):
    import sys
    sys.path.insert(0, root)
    from benchmarks.scale import draw                  # the benchmark's own figure
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    draw(scale["steps"], axes)
    plt.tight_layout(); plt.show()
    print(f"{'transform':<18} {'n':>7} {'dev':>3} {'leaves':>6} {'x adam':>8} {'temp/params':>11} {'max moved/leaf':>14}")
    for r in scale["steps"]:
        print(f"{r['transform']:<18} {r['n']:7.0e} {r['devices']:3d} {r['leaves']:6d} {r['ratio_to_adam']:8.2f} "
              f"{r['temp_over_device_params']:11.2f} {r['largest_collective_over_leaf']:14.3f}")
    c = scale.get("compress")
    if c:
        w = c["warm"]
        print(f"\ncompression of {c['weights']:.2e} weights (warm): pipeline {w['pipeline_ratio_to_sort']:.1f}x np.sort, "
              f"cluster_weights {w['ratio_to_sort']['cluster_weights']:.1f}x, extra peak "
              f"{w['pipeline_extra_peak_over_params']:.2f}x the params")
else:
    print("scale.json not found")

# %% [markdown]
# ## What the output shows
#
# * **Prox speed**: the printed table gives, for the largest group, each method's median time and its ratio to the
#   NumPy/SciPy float64 pipeline (below 1: faster). On CPU `auto` picks the `host` method, whose cost, like the
#   pipeline's, is dominated by sorting; the pure-JAX `device` method is slow on CPU and is the one that pays off
#   on the GPU, where `auto` picks it. The plots show how the inputs differ: *collapse* and the adversarial
#   *chain* input are the hard cases for the device method's parallel pooling.
# * **Prior overhead**: the printed ratios compare one step with the mixture prior to Adam alone and to the naive
#   implementation (`ratio_to_naive` below 1: the prior is faster). The right-hand plots show the point of the
#   chunked evaluation: the naive version's extra memory grows with the number of components K (an n × K array),
#   the prior's stays a small multiple of the parameters' size. Either way, on a real network the prior's step is
#   a small share of the whole training step, which also runs the forward and backward passes.
# * **Tying**: which method has the lowest test loss for each relatedness δ is printed; tying helps when the tasks
#   are related and the soft tie can relax when they are not.
# * **Scale**: the table lists every step row; `max moved/leaf` is the largest array any collective of the step
#   moves, as a fraction of a leaf (1.0: a whole leaf gathered); the compression line gives the pipeline's cost in
#   sorts of the same weights.
# * **Reproductions**: for the experiments whose results exist, the bars compare this package's runs with the
#   papers' numbers (shift detection) or the models of the shuffled-inputs experiment; all numbers are printed.
