"""The .py files here are notebook sources and their build script, not test modules.

Importing a notebook source (which ``--doctest-modules`` would do) runs the whole notebook; nbmake already
executes the generated .ipynb files, and tests/test_notebooks.py checks that those match the sources.
"""

collect_ignore_glob = ["*.py"]
