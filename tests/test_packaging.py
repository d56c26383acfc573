"""The package's dependencies are declared where they are used (pyproject.toml).

Runtime dependencies are what ``import softshare_jax`` and its public
functions import; everything else (flax, matplotlib, the datasets) belongs to
an extra. Checked from the source, so a new import without a declaration, or a
declaration nothing imports, fails here.
"""

from __future__ import annotations

import ast
import pathlib
import re
import sys
import tomllib

import softshare_jax as ss

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = pathlib.Path(ss.__file__).parent
# Distribution name -> the module it installs, where they differ.
MODULE_OF = {"scikit-learn": "sklearn", "orbax-checkpoint": "orbax"}


def pyproject() -> dict:
  with open(ROOT / "pyproject.toml", "rb") as f:
    return tomllib.load(f)


def distribution(requirement: str) -> str:
  return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].strip()


def top_level_imports(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module.split(".")[0])
  return names


def package_imports() -> set[str]:
  names = set()
  for source in PACKAGE.rglob("*.py"):
    names |= top_level_imports(source)
  return names - set(sys.stdlib_module_names) - {"softshare_jax"}


def test_the_package_imports_only_its_runtime_dependencies():
  runtime = {MODULE_OF.get(d, d) for d in map(distribution, pyproject()["project"]["dependencies"])}
  imported = package_imports()
  assert imported <= runtime, f"imported but not a runtime dependency: {imported - runtime}"
  # jaxlib comes with jax; every other runtime dependency is really used.
  assert runtime - imported <= {"jaxlib"}, f"declared but never imported: {runtime - imported - {'jaxlib'}}"


def test_flax_and_the_datasets_are_extras_not_runtime():
  project = pyproject()["project"]
  runtime = {distribution(d) for d in project["dependencies"]}
  assert not runtime & {"flax", "chex", "matplotlib", "scikit-learn", "mlxtend", "mnist1d"}
  bench = {distribution(d) for d in project["optional-dependencies"]["bench"]}
  assert {"flax", "matplotlib", "scikit-learn", "mlxtend", "mnist1d"} <= bench


def test_the_benchmarks_import_only_what_their_extras_declare():
  extras = pyproject()["project"]["optional-dependencies"]
  declared = {MODULE_OF.get(d, d) for e in extras.values() for d in map(distribution, e)}
  declared |= {MODULE_OF.get(d, d) for d in map(distribution, pyproject()["project"]["dependencies"])}
  imported = set()
  for source in (ROOT / "benchmarks").glob("*.py"):
    imported |= top_level_imports(source)
  imported -= set(sys.stdlib_module_names) | {"softshare_jax", "benchmarks"}
  assert imported <= declared, f"imported by benchmarks/ but declared nowhere: {imported - declared}"
