# %% [markdown]
# # Soft weight sharing as a regularizer: small-data generalization
#
# Nowlan & Hinton (1992) proposed the learned mixture prior to make small networks generalize from little data.
# This notebook only reads what two benchmark scripts committed to `benchmarks/results/` and plots it; nothing is
# trained here:
#
# * `shift_detection.json` (`python -m benchmarks.shift_detection`): their shift-detection task on the paper's
#   protocol (±1 targets, the cost of their eq. 4 with a learned noise level, every parameter and the mixture
#   optimized together by full-batch L-BFGS), for several choices the paper does not state;
# * `generalization.json` (`python -m benchmarks.generalization`): four problems with ~100 weights and 100-150
#   training examples (shift detection, scikit-learn's diabetes, a Mackey-Glass series, Friedman #1); plain
#   training, weight decay, weight elimination and soft-share (a zero component plus 4 or 8 free components),
#   every strength, soft-share's hyper-prior on the precisions and its number of components chosen on
#   validation data only, 10 seeds.
#
# Both train soft-share with `ss.mixture_penalty(params, mixture)`: the mixture prior's cost as a differentiable
# function, the mixture a leaf of the optimized pytree. Protocols and findings: `docs/benchmarks.md`.

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

# %% [markdown]
# ## 1. Shift detection on the paper's protocol
#
# Test accuracy per method for every variant of the unstated choices (input coding, hidden activation, initial
# weight scale), next to the paper's Table 1. The goal is the paper's ordering, plain < cross-validation < weight
# elimination < soft-share, with soft-share at 95 % or more.

# %%
shift = load("shift_detection.json")
if shift:
    methods = ["plain", "cross-validation", "weight elimination", "soft-share 5", "soft-share 10"]
    paper = {m: shift["summary"][m]["paper_test_pct"]["mean"] for m in methods}
    print(f"{'variant':<18}" + "".join(f"{m:>20}" for m in methods) + "   ordering  >=95%")
    print(f"{'paper':<18}" + "".join(f"{paper[m]:>20.1f}" for m in methods))
    for v, summary in shift["summaries"].items():
        cells = "".join(f"{summary[m]['test_pct']['mean']:>12.1f} ± {summary[m]['test_pct']['std']:4.1f} " for m in methods)
        g = shift["goal"]["per_variant"][v]
        print(f"{v:<18}{cells}   {str(g['ordering_as_paper']):<9} {g['soft_share_at_least_95']}")
    fig, ax = plt.subplots(figsize=(10, 3.8))
    groups = ["paper", *shift["summaries"]]
    width = 0.8 / len(groups)
    for g, group in enumerate(groups):
        vals = [paper[m] if group == "paper" else shift["summaries"][group][m]["test_pct"]["mean"] for m in methods]
        ax.bar(np.arange(len(methods)) + (g - (len(groups) - 1) / 2) * width, vals, width, label=group,
               color="0.7" if group == "paper" else None)
    ax.set_xticks(np.arange(len(methods)), methods)
    ax.set(ylim=(40, 100), ylabel="test % correct (mean of seeds)", title="shift detection, paper's protocol")
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    plt.tight_layout(); plt.show()
    print(shift["findings"])
else:
    print("shift_detection.json not found")

# %% [markdown]
# The learned mixture of one soft-share run (base variant, seed 0) over its 101 weights:

# %%
if shift:
    r = shift["runs"]["soft-share 10"][0]
    w, m = np.asarray(r["weights"]), r["mixture"]
    lim = np.abs(w).max() * 1.1
    grid = np.linspace(-lim, lim, 800)
    dens = sum(pi * np.exp(-0.5 * ((grid - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
               for mu, sd, pi in zip(m["means"], m["stddevs"], m["weights"]))
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.hist(w, bins=60, range=(-lim, lim), alpha=0.6, label="weights")
    ax.plot(grid, dens * len(w) * 2 * lim / 60, color="C3", label="learned mixture (scaled)")
    ax.set(xlabel="weight", ylabel="count", title=f"soft-share 10, seed 0: test {100 * (1 - r['test_error']):.1f} %")
    ax.legend(); plt.tight_layout(); plt.show()
    for mu, sd, pi in sorted(zip(m["means"], m["stddevs"], m["weights"])):
        print(f"mean {mu:7.3f}  std {sd:7.3f}  proportion {pi:.3f}")

# %% [markdown]
# ## 2. The small-data suite
#
# Test error at the strength chosen on validation (mean ± std over seeds; shift detection in % misclassified,
# the regressions in mean squared error over the training target's variance). Soft-share's precisions get one
# of two hyper-priors, chosen on validation with c: `auto` (the library default, Gamma(3/2, var(w)/(2K²)), scaled
# by the weights' own spread) or `nu=100` (a fixed-scale Gamma(ν/2 + 1, ν/2) centred on the starting σ = 1 and
# weighing as much as 100 weights, which keeps the components broad). "collapsed": mixture components with σ
# below 1 % of the weights' spread holding less than 1.5 weights, the degenerate maximum of a mixture
# likelihood; "live": components with more than 1 % of the mass. The goal compares the soft-share K with the
# lower validation error against the best baseline's test error.

# %%
gen = load("generalization.json")
if gen:
    print(f"mode {gen['settings']['mode']}, {gen['settings']['seeds']} seeds, {gen['settings']['optimizer']}")
    print(f"{'problem':<16}{'method':<20}{'test error':>18}{'chosen c':>10}{'prior':>8}{'collapsed':>10}{'live':>6}")
    for problem, methods in gen["summary"].items():
        scale = 100 if problem == "shift detection" else 1
        for label, s in methods.items():
            col = f"{s['collapsed_components']['mean']:.1f}" if "collapsed_components" in s else "-"
            live = f"{s['live_components']['mean']:.1f}" if "live_components" in s else "-"
            te = s["test_error"]
            print(f"{problem:<16}{label:<20}{scale * te['mean']:>11.3f} ± {scale * te['std']:.3f}{s['chosen_c']:>10g}"
                  f"{s.get('chosen_precision_prior', '-'):>8}{col:>10}{live:>6}")
    g = gen["goal"]
    for problem, p in g["per_problem"].items():
        print(f"{problem:<16} best baseline {p['best_baseline']:.4f}  {p.get('soft_share_chosen', 'soft-share')} "
              f"{p['best_soft_share']:.4f}  no worse: {p['soft_share_no_worse']}")
    print(f"\nsoft-share no worse than the best baseline on {g['problems_won']} of {len(g['per_problem'])} problems")
    fig, axes = plt.subplots(1, len(gen["summary"]), figsize=(3.6 * len(gen["summary"]), 3.4))
    for ax, (problem, methods) in zip(np.atleast_1d(axes), gen["summary"].items()):
        scale = 100 if problem == "shift detection" else 1
        labels = list(methods)
        ax.bar(range(len(labels)), [scale * methods[l]["test_error"]["mean"] for l in labels],
               yerr=[scale * methods[l]["test_error"]["std"] for l in labels], capsize=3,
               color=["0.6", "C0", "C1", "C2", "C3"][:len(labels)])
        ax.set_xticks(range(len(labels)), [l.replace(" ", "\n", 1) for l in labels], fontsize=7)
        ax.set_title(problem, fontsize=9)
    plt.tight_layout(); plt.show()
else:
    print("generalization.json not found")

# %% [markdown]
# Validation error against the strength c for every method (mean over seeds): the curve the choice was read from
# (for soft-share, that of its chosen hyper-prior; dashed: the other one).

# %%
if gen:
    fig, axes = plt.subplots(1, len(gen["summary"]), figsize=(3.6 * len(gen["summary"]), 3.2))
    for ax, (problem, methods) in zip(np.atleast_1d(axes), gen["summary"].items()):
        for label, s in methods.items():
            cs = sorted(float(c) for c in s["valid_error_by_c"])
            if len(cs) > 1:
                line, = ax.plot(cs, [s["valid_error_by_c"][str(c)] for c in cs], "o-", ms=3, label=label)
            for prior, curve in s.get("valid_error_by_prior", {}).items():
                if prior != s["chosen_precision_prior"]:
                    cs = sorted(float(c) for c in curve)
                    ax.plot(cs, [curve[str(c)] for c in cs], "--", color=line.get_color(), lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="c (strength × N)", title=problem)
        ax.legend(fontsize=6)
    plt.tight_layout(); plt.show()

# %% [markdown]
# Reading the "prior" and "live" columns: where the fixed-scale `nu=100` prior is chosen, the learned mixture
# ends with one live component, the zero component (σ_0 ≈ 0.7-0.9, π_0 ≈ 1): soft-share has become a
# weight decay whose precision it learned, c/σ_0² instead of c, i.e. a strength between the grid points that
# weight decay is offered. Where `auto` is chosen (Friedman #1), the zero component turns narrow (σ_0 ≈ 0.01) and
# holds most weights while the free components keep the rest: the sparsifying prior of weight elimination, with
# its scale learned. Under `auto`, components collapsing onto a single weight appear only at large c (>= 1), never
# at a chosen strength.
