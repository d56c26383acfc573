"""Shared helpers for the benchmark scripts: timing, machine facts, output.

Every benchmark script in this folder measures with :func:`time_call`, records
:func:`machine_info` and :func:`versions` next to its numbers, prints with
:func:`format_table`, and writes its JSON with :func:`write_json_atomic` (a
temporary file in the target directory, then ``os.replace``), so a reader never
sees a half-written result file (:class:`Recorder` does the timing, the head of
the JSON and the writing for a whole run). Speed is measured here, never
asserted in a test. Also here: :func:`progress_bar`, :func:`mean_std` and
:func:`fmt_mean_std` for results over seeds, :func:`mixture_dict`, and the
figure helpers :func:`pyplot`, :func:`hist_with_mixture`, :func:`save_figure`.
Data sets are in ``datasets``, training and evaluation in ``training``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Timing:
  """Wall-clock seconds of the timed calls (after the warm-up calls)."""

  times_s: list[float]
  warmup_s: list[float]

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s) if self.times_s else math.nan

  @property
  def min_s(self) -> float:
    return min(self.times_s) if self.times_s else math.nan

  def to_dict(self) -> dict:
    return {
        "median_ms": self.median_s * 1e3,
        "min_ms": self.min_s * 1e3,
        "times_ms": [t * 1e3 for t in self.times_s],
        "warmup_ms": [t * 1e3 for t in self.warmup_s],
    }


def block(out: Any) -> Any:
  """Waits for every JAX array in ``out`` (NumPy values pass through)."""
  import jax  # Imported here so that NumPy-only scripts need no JAX.

  return jax.block_until_ready(out)


def time_call(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 7,
    budget_s: float = 2.0,
    stop_after_s: float = math.inf,
    sync: Callable[[Any], Any] = block,
) -> tuple[Timing, Any]:
  """Times ``fn()`` and returns its :class:`Timing` and its last output.

  ``warmup`` untimed calls come first (compilation, caches). Then the call is
  repeated at least ``min_repeats`` and at most ``max_repeats`` times, stopping
  once ``budget_s`` has been spent on timed calls. If a single call takes
  longer than ``stop_after_s``, timing stops after it (one sample only, and the
  warm-up is skipped when it alone took that long). ``sync`` is applied to each
  output before the clock stops (``block_until_ready`` for JAX).
  """
  warm, out = [], None
  for _ in range(warmup):
    start = time.perf_counter()
    out = sync(fn())
    warm.append(time.perf_counter() - start)
    if warm[-1] > stop_after_s:
      return Timing([warm[-1]], warm), out
  times: list[float] = []
  while len(times) < max_repeats:
    start = time.perf_counter()
    out = sync(fn())
    times.append(time.perf_counter() - start)
    if times[-1] > stop_after_s:
      break
    if len(times) >= min_repeats and sum(times) >= budget_s:
      break
  return Timing(times, warm), out


# ----------------------------------------------------------------------------
# What was measured on what.


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def machine_info() -> dict:
  """Platform, processor, CPU count and the JAX devices of this process."""
  info = {
      "platform": platform.platform(),
      "machine": platform.machine(),
      "processor": platform.processor() or _cpu_model(),
      "cpu_model": _cpu_model(),
      "cpu_count": os.cpu_count(),
  }
  if hasattr(os, "sched_getaffinity"):
    info["cpus_usable"] = len(os.sched_getaffinity(0))
  if hasattr(os, "getloadavg"):
    # Other processes on a small machine move timings; the load says how busy it was.
    info["loadavg_1_5_15"] = list(os.getloadavg())
  try:
    import jax

    info["jax_backend"] = jax.default_backend()
    info["jax_devices"] = [
        {"id": d.id, "platform": d.platform, "device_kind": d.device_kind, "repr": str(d)}
        for d in jax.devices()
    ]
  except Exception as e:  # pragma: no cover - a broken JAX install is still worth a record.
    info["jax_error"] = repr(e)
  return info


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def versions(extra: Iterable[str] = ()) -> dict:
  """Versions of Python and of the packages a benchmark depends on."""
  out = {"python": sys.version.split()[0]}
  for dist in ("jax", "jaxlib", "numpy", "scipy", "optax", "flax", *extra):
    out[dist] = _version(dist)
  try:
    import softshare_jax

    out["softshare_jax"] = getattr(softshare_jax, "__version__", None) or _version("softshare-jax")
  except ImportError:
    out["softshare_jax"] = None
  return out


def source_info(package: str = "softshare_jax") -> dict:
  """Which code was measured: a hash of the package's sources, and git's view when there is one.

  The version number does not change between commits; the hash does, and it is
  there even where the tree was copied without its ``.git``.
  """
  out: dict[str, Any] = {}
  try:
    mod = __import__(package)
    root = os.path.dirname(os.path.abspath(mod.__file__))
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
      dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
      for name in sorted(filenames):
        if name.endswith(".py"):
          path = os.path.join(dirpath, name)
          digest.update(os.path.relpath(path, root).encode())
          with open(path, "rb") as f:
            digest.update(f.read())
    out["package_sha256"] = digest.hexdigest()[:16]
    repo = os.path.dirname(root)
  except ImportError:
    return out

  def git(*args):
    try:
      res = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
      return None
    return res.stdout if res.returncode == 0 else None

  commit = git("rev-parse", "HEAD")
  if commit:
    out["git_commit"] = commit.strip()
    out["git_modified"] = [line[3:] for line in (git("status", "--porcelain", "--", package) or "").splitlines()]
  return out


def now_utc() -> str:
  """The time now, UTC, ISO 8601 to the second."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_record(benchmark: str, started_utc: str, runtime_s: float, machine: dict,
               extra_versions: Iterable[str] = ()) -> dict:
  """The head of every result JSON: what ran, when, for how long, on what, with which code."""
  import jax

  now = now_utc()
  return {
      "benchmark": benchmark,
      "created_utc": now,
      "started_utc": started_utc,
      "finished_utc": now,
      "backend": jax.default_backend(),
      "runtime_s": runtime_s,
      "machine": machine,
      "versions": versions(extra=extra_versions),
      "source": source_info(),
  }


class Recorder:
  """One reproduction run: made at its start, then :meth:`stop` and :meth:`write` its result JSON.

  The JSON starts with :func:`run_record`'s head (what ran, when, for how
  long, on what, with which code) and goes to ``<out>/<benchmark>.json``.
  """

  def __init__(self, benchmark: str, extra_versions: Iterable[str] = ()):
    self.benchmark, self.extra_versions = benchmark, tuple(extra_versions)
    self.machine = machine_info()  # Before the run: the load average is the other processes'.
    self.started_utc = now_utc()
    self._start = time.perf_counter()
    self.elapsed_s = math.nan

  def stop(self) -> float:
    """Seconds since the start; they are the runtime that :meth:`write` records."""
    self.elapsed_s = time.perf_counter() - self._start
    return self.elapsed_s

  def write(self, out_dir: str, body: dict, name: str | None = None) -> str:
    """Writes the head, then ``body``, to ``<out_dir>/<name>.json`` (default name: the benchmark's); returns the path."""
    head = run_record(self.benchmark, self.started_utc, self.elapsed_s, self.machine, self.extra_versions)
    return write_json_atomic(os.path.join(out_dir, f"{name or self.benchmark}.json"), {**head, **body})


# ----------------------------------------------------------------------------
# Output.


def _json_safe(obj: Any) -> Any:
  """NaN and infinities become None (JSON has neither); NumPy scalars become Python."""
  if isinstance(obj, dict):
    return {str(k): _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def write_json_atomic(path: str, obj: Any) -> str:
  """Writes ``obj`` as JSON to ``path`` atomically; returns the path."""
  from softshare_jax import files

  text = json.dumps(_json_safe(obj), indent=1, allow_nan=False) + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # --out may name a new folder
  files.write_bytes_atomic(path, text.encode("utf-8"))
  return path


def pyplot() -> Any:
  """``matplotlib.pyplot`` on the Agg backend: the scripts write files and need no display."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig: Any, path: str, dpi: int = 110) -> str:
  """Saves a Matplotlib figure to ``path`` atomically (temp file + rename) and closes it."""
  import matplotlib.pyplot as plt
  from softshare_jax import files

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  try:
    with files.atomic_path(path, suffix=os.path.splitext(path)[1]) as tmp:
      fig.savefig(tmp, dpi=dpi)
  finally:
    plt.close(fig)
  return path


def argument_parser(module: str, doc: str, quick_help: str) -> argparse.ArgumentParser:
  """The options every reproduction script takes: ``--quick``, ``--out DIR``, ``--no-progress``."""
  parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help=quick_help)
  parser.add_argument("--out", default=RESULTS_DIR, help="directory for the results (default: %(default)s)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  return parser


def mean_std(values: Sequence[float]) -> dict:
  """Mean, sample standard deviation (0 for one value), count and the values; NaNs are left out."""
  values = [v for v in values if v == v]
  return {"mean": statistics.fmean(values) if values else math.nan,
          "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values), "values": values}


class _NoBar:
  """Stands in for a tqdm bar where tqdm is not installed: the same methods, showing nothing."""

  def __init__(self, items: Any = None):
    self._items = items

  def __iter__(self):
    return iter(self._items)

  def update(self, n: int = 1) -> None:
    del n

  def set_postfix(self, *args, **kwargs) -> None:
    del args, kwargs

  def set_postfix_str(self, s: str = "") -> None:
    del s

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def progress_bar(items: Any = None, desc: str | None = None, enabled: bool = True, **kwargs) -> Any:
  """A tqdm bar on stderr over ``items`` (an iterable, or a total count as an int).

  Hidden when ``enabled`` is False (``--no-progress``) or stderr is not a
  terminal; without tqdm installed, a stand-in that shows nothing.
  """
  try:
    from tqdm import tqdm
  except ImportError:  # pragma: no cover - tqdm is a dev dependency.
    return _NoBar(None if isinstance(items, int) else items)
  if isinstance(items, int):
    items, kwargs["total"] = None, items
  return tqdm(items, desc=desc, disable=None if enabled else True, file=sys.stderr, **kwargs)


def fmt_mean_std(stat: dict, digits: int = 1, scale: float = 1.0, single: bool = False) -> str:
  """``mean ± std`` of a :func:`mean_std` record, both times ``scale``.

  With ``single``, a record of one value shows only its mean (its std is 0 by
  construction, not a measured spread).
  """
  mean, std = scale * stat["mean"], scale * stat["std"]
  if single and stat["n"] <= 1:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def mixture_dict(mixture: Any) -> dict:
  """A mixture's means, standard deviations and weights as lists (for the result JSON)."""
  import numpy as np

  return {"means": np.asarray(mixture.means).tolist(), "stddevs": np.asarray(mixture.stddevs).tolist(),
          "weights": np.asarray(mixture.weights).tolist()}


def hist_with_mixture(ax: Any, weights: dict, mixture: Any, lo: float, hi: float, bins: int = 240,
                      label: str = "learned mixture") -> None:
  """Density histograms of ``weights`` (legend label → values) on a log scale, ``mixture``'s density on top."""
  import jax.numpy as jnp
  import numpy as np
  import softshare_jax as ss

  edges = np.linspace(lo, hi, bins + 1)
  for name, w in weights.items():
    ax.hist(w, bins=edges, density=True, alpha=0.5, label=name)
  grid = np.linspace(lo, hi, 3000)
  ax.plot(grid, np.exp(np.asarray(ss.mixture_log_prob(mixture, jnp.asarray(grid, jnp.float32)))), color="C3",
          lw=1, label=label)
  ax.set_yscale("log")
  ax.set_ylim(1e-2, None)
  ax.set_xlabel("weight")
  ax.legend(fontsize=8)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
  """An aligned text table; ``align`` holds '<' or '>' per column (default: text left, numbers right)."""
  cells = [[str(c) for c in r] for r in rows]
  widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
  if align is None:
    align = "".join(
        ">" if rows and isinstance(rows[0][i], (int, float)) else "<" for i in range(len(headers))
    )

  def line(values):
    return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, align, widths)).rstrip()

  return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def fmt_ms(seconds: float) -> str:
  """Milliseconds with three significant digits (or '-' when missing)."""
  if seconds is None or not math.isfinite(seconds):
    return "-"
  ms = seconds * 1e3
  return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def fmt_ratio(r: float | None) -> str:
  """A ratio with two decimals (none from 100 on), or '-' when missing."""
  if r is None or not math.isfinite(r):
    return "-"
  return f"{r:.2f}" if r < 100 else f"{r:.0f}"
