"""The committed notebooks are generated from their jupytext sources: notebooks/NN_*.py -> NN_*.ipynb.

nbmake executes the .ipynb files; these tests make sure that what it executes is what the sources say, and
that the committed files carry the outputs of a complete run (``python notebooks/build.py`` regenerates them).
"""

import glob
import os

import jupytext
import nbformat
import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
SOURCES = sorted(glob.glob(os.path.join(NOTEBOOKS, "[0-9][0-9]_*.py")))
REBUILD = "regenerate it with `python notebooks/build.py {}`"


def _cells(nb):
  return [(cell.cell_type, cell.source) for cell in nb.cells]


def test_every_notebook_has_a_source():
  stems = lambda paths: sorted(os.path.splitext(os.path.basename(p))[0] for p in paths)
  assert SOURCES
  assert stems(glob.glob(os.path.join(NOTEBOOKS, "*.ipynb"))) == stems(SOURCES)


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_notebook_matches_its_source(source):
  name = os.path.basename(source)
  committed = nbformat.read(os.path.splitext(source)[0] + ".ipynb", as_version=4)
  assert _cells(committed) == _cells(jupytext.read(source, fmt="py:percent")), (
      f"{name} and its .ipynb differ: " + REBUILD.format(name))


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_notebook_is_committed_executed(source):
  name = os.path.basename(source)
  committed = nbformat.read(os.path.splitext(source)[0] + ".ipynb", as_version=4)
  code = [cell for cell in committed.cells if cell.cell_type == "code"]
  assert all(cell.execution_count for cell in code), f"{name}: not executed; " + REBUILD.format(name)
  errors = [out.ename for cell in code for out in cell.outputs if out.output_type == "error"]
  assert not errors, f"{name}: the committed run raised {errors}; " + REBUILD.format(name)
