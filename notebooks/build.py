"""Generates the example notebooks (.ipynb) from their jupytext sources (.py) and executes them in place.

    .venv/bin/python notebooks/build.py                     # all the notebooks
    .venv/bin/python notebooks/build.py 02_compression.py   # only the ones named

The ``NN_*.py`` files (jupytext percent format) are the source of truth; the .ipynb files are committed
executed, so that they read with their outputs on GitHub, and ``tests/test_notebooks.py`` fails when their
cells differ from the sources. The notebooks run in a quick mode by default; ``SOFTSHARE_FULL=1`` in the
environment selects the longer runs.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import sys
import time

import jupytext
import nbclient
import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(glob.glob(os.path.join(HERE, "[0-9][0-9]_*.py")))

# Paths of this machine (a site-packages, the checkout) would otherwise land in warnings and tracebacks.
_ABS = re.compile(r"(/[\w.\-]+)+/(site-packages|notebooks|benchmarks)/")


def _stable_ids(nb) -> None:
  # jupytext gives every cell a random id; ids derived from the source keep rebuilds free of id churn.
  seen = set()
  for cell in nb.cells:
    base = hashlib.sha1(cell.source.encode()).hexdigest()[:8]
    cell_id, n = base, 1
    while cell_id in seen:
      cell_id, n = f"{base}-{n}", n + 1
    seen.add(cell_id)
    cell.id = cell_id


def _clean(nb) -> None:
  """Drops machine-specific noise: stderr streams, absolute paths, execution timing metadata."""
  for cell in nb.cells:
    cell.metadata.pop("execution", None)
    if cell.cell_type != "code":
      continue
    outputs = []
    for out in cell.outputs:
      if out.output_type == "stream" and out.name == "stderr":
        continue
      if out.output_type == "stream":
        out.text = _ABS.sub(r"\2/", out.text)
      outputs.append(out)
    cell.outputs = outputs


def build(source: str) -> str:
  nb = jupytext.read(source, fmt="py:percent")
  nb.metadata = nbformat.NotebookNode(
      kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"})
  _stable_ids(nb)
  start = time.perf_counter()
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": HERE}}).execute()
  _clean(nb)
  # The kernel fills in its version details; only the name is kept, so rebuilds elsewhere do not differ.
  nb.metadata["language_info"] = {"name": "python"}
  nbformat.validate(nb)
  target = os.path.splitext(source)[0] + ".ipynb"
  nbformat.write(nb, target)
  print(f"{os.path.basename(target)}: executed in {time.perf_counter() - start:.0f} s")
  return target


if __name__ == "__main__":
  stem = lambda path: os.path.splitext(os.path.basename(path))[0]
  wanted = {stem(a) for a in sys.argv[1:]}
  chosen = [s for s in SOURCES if not wanted or stem(s) in wanted]
  if len(chosen) != (len(wanted) or len(SOURCES)):
    sys.exit(f"unknown notebook in {sorted(wanted)}; the sources are {[stem(s) for s in SOURCES]}")
  for source in chosen:
    build(source)
