"""compression_report's quality section: relative change, weights snapped to zero, idle components, warnings.

Every expected value is computed by hand from small tensors (the arithmetic
is in the comments), not with the package.
"""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

import softshare_jax as ss

# Before quantization.
W = np.array([[1.0, 2.0], [0.1, -0.2]], np.float32)
V = np.array([[1.0, -1.0], [1.0, -1.0]], np.float32)
# After: w's two small weights snapped to zero; v entirely to zero.
WQ = np.array([[1.0, 2.0], [0.0, 0.0]], np.float32)
VQ = np.zeros((2, 2), np.float32)


def quantized(**leaves):
  """A Quantized holding exactly these values (quantize with no mixture is lossless)."""
  return ss.quantize({k: jnp.asarray(v) for k, v in leaves.items()}, None)


def test_relative_change_and_snapped_to_zero_by_hand():
  rep = ss.compression_report(quantized(w=WQ, b=np.ones(2, np.float32)),
                              params={"w": jnp.asarray(W), "b": jnp.ones(2)})
  (w,) = [q for q in rep.quality if q.path == "w"]
  # ‖WQ − W‖² = 0.1² + 0.2² = 0.05; ‖W‖² = 1 + 4 + 0.05 = 5.05.
  assert w.relative_change == pytest.approx(math.sqrt(0.05 / 5.05), rel=1e-6)
  assert w.snapped_to_zero == 0.5  # 2 of the 4 weights: 0.1 and -0.2
  assert w.weights == 4
  assert [q.path for q in rep.quality] == ["w"]  # kept leaves (the bias) are not quantized: not listed
  assert rep.warnings == ()  # 0.0995 < 0.2
  assert "WARNING" not in str(rep)
  assert "relative change 0.100, snapped to zero 50.0%" in str(rep)


def test_warning_above_the_threshold_names_the_leaf():
  rep = ss.compression_report(quantized(w=WQ, v=VQ), params={"w": W, "v": V})
  v = [q for q in rep.quality if q.path == "v"][0]
  assert v.relative_change == 1.0 and v.snapped_to_zero == 1.0  # ‖0 − V‖ / ‖V‖
  assert len(rep.warnings) == 1
  assert "relative change 1.00 on v (threshold 0.2)" in rep.warnings[0]
  assert " on w" not in rep.warnings[0]  # w stays under the threshold
  lines = str(rep).splitlines()
  assert lines[-1] == "WARNING: " + rep.warnings[0]
  d = rep.to_dict()
  assert d["warnings"] == list(rep.warnings)
  assert [q["path"] for q in d["quality"]] == ["v", "w"]
  json.dumps(d)  # plain JSON types


def test_threshold_is_inclusive_and_edge_cases():
  # A relative change of exactly the threshold does not warn: w = (5, 0), wq = (4, 0): 1 / 5 = 0.2.
  rep = ss.compression_report(quantized(a=np.array([[4.0, 0.0]], np.float32)),
                              params={"a": np.array([[5.0, 0.0]], np.float32)})
  assert rep.quality[0].relative_change == 0.2 == ss.CompressionReport.RELATIVE_CHANGE_WARNING
  assert rep.warnings == ()
  assert rep.quality[0].snapped_to_zero == 0.0  # the zero was zero before
  # All-zero weights: 0 when they stay zero, inf (and a warning) when they do not.
  rep = ss.compression_report(quantized(z=np.zeros((2, 2), np.float32), n=np.full((2, 2), 0.5, np.float32)),
                              params={"z": np.zeros((2, 2), np.float32), "n": np.zeros((2, 2), np.float32)})
  by = {q.path: q.relative_change for q in rep.quality}
  assert by == {"n": math.inf, "z": 0.0}
  assert "relative change inf on n" in rep.warnings[0]
  # A NaN weight before quantization: the change is NaN, and it warns (not silently under the threshold).
  w_nan = W.copy()
  w_nan[0, 0] = np.nan
  rep = ss.compression_report(quantized(w=WQ), params={"w": w_nan})
  assert math.isnan(rep.quality[0].relative_change) and len(rep.warnings) == 1


def test_many_leaves_are_listed_worst_first_five_at_most():
  leaves = {f"l{i}": np.full((1, 2), 0.0, np.float32) for i in range(7)}
  params = {f"l{i}": np.array([[1.0, 1.0 + i]], np.float32) for i in range(7)}
  rep = ss.compression_report(quantized(**leaves), params=params)
  assert all(q.relative_change == 1.0 for q in rep.quality)
  assert "and 2 more leaves" in rep.warnings[0]


def test_params_must_match_the_quantized_tree():
  q = quantized(w=WQ)
  with pytest.raises(ValueError, match=r"params must hold the weights before quantization.*'w'"):
    ss.compression_report(q, params={"x": W})
  with pytest.raises(ValueError, match=r"params leaf 'w' has shape \(4,\), the quantized leaf \(2, 2\)"):
    ss.compression_report(q, params={"w": W.ravel()})


def mixture(means, weights, has_zero=True):
  """A Mixture with these means (the zero component's first) and proportions."""
  means, weights = np.asarray(means, np.float64), np.asarray(weights, np.float64)
  free = weights[1:] if has_zero else weights
  return ss.Mixture(free_means=jnp.asarray(means[1:] if has_zero else means, jnp.float32),
                    log_precisions=jnp.zeros(len(means)), logits=jnp.asarray(np.log(free / free.sum()), jnp.float32),
                    zero_logit=jnp.asarray(np.log(weights[0] / free.sum()) if has_zero else 0.0, jnp.float32),
                    has_zero=has_zero)


def test_components_share_and_idle_by_hand():
  # 2000 weights: 1000 at 0, 999 at 0.5, 1 at -0.5; component 3 (mean 2) holds none.
  values = np.concatenate([np.zeros(1000), np.full(999, 0.5), [-0.5]]).astype(np.float32).reshape(40, 50)
  m = mixture([0.0, 0.5, -0.5, 2.0], [0.5, 0.4995, 0.0004, 0.0001])
  rep = ss.compression_report(quantized(w=values), mixture=m)
  shares = [c.share for c in rep.components]
  assert shares == pytest.approx([0.5, 0.4995, 0.0005, 0.0])
  assert [c.proportion for c in rep.components] == pytest.approx([0.5, 0.4995, 0.0004, 0.0001], rel=1e-4)
  assert [c.mean for c in rep.components] == pytest.approx([0.0, 0.5, -0.5, 2.0])
  # Idle: π < 1e-3 or share < 1e-3: components 2 (0.0004, 0.0005) and 3.
  assert [c.idle for c in rep.components] == [False, False, True, True]
  assert "mixture: 4 components, 2 holding almost no weight (proportion or share of the weights < 0.001): [2, 3]" \
      in str(rep)
  assert rep.warnings == ()  # idle components are reported, not warned about
  assert [c["index"] for c in rep.to_dict()["components"]] == [0, 1, 2, 3]


def test_components_nearest_mean_after_fine_tuning():
  # Codebook entries that moved off the means (keep_clusters fine-tuning) count for the nearest mean.
  values = np.array([[0.0, 0.48, 0.52, 0.52]], np.float32)
  rep = ss.compression_report(quantized(w=values), mixture=mixture([0.0, 0.5, 3.0], [0.25, 0.7, 0.05]))
  assert [c.share for c in rep.components] == pytest.approx([0.25, 0.75, 0.0])


def test_a_broken_mixture_is_refused():
  m = mixture([0.0, 0.5], [0.5, 0.5])
  bad = ss.Mixture(free_means=jnp.array([jnp.nan]), log_precisions=m.log_precisions, logits=m.logits,
                   zero_logit=m.zero_logit, has_zero=True)
  with pytest.raises(ValueError, match="mixture is not finite"):
    ss.compression_report(quantized(w=WQ), mixture=bad)


def test_no_quality_section_without_params_or_mixture():
  rep = ss.compression_report(quantized(w=WQ))
  assert rep.quality == () and rep.components == () and rep.warnings == ()
  assert "quality" not in str(rep) and "mixture" not in str(rep)
  assert rep.to_dict()["warnings"] == []
