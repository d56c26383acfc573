"""Builds the optional C host kernel; everything else lives in pyproject.toml.

The extension is optional: without a C compiler the package installs and the
host method falls back to NumPy/SciPy.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "softshare_jax.hostprox",
            ["softshare_jax/hostprox.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
