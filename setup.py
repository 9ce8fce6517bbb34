"""Only the C part of the build; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # The compact engine map of the in-memory prefix index (src/edgellm/kvindex/_rows.c):
        # ~50 bytes a block where Python objects cost ~150 (bench/lookup.py measures RSS).
        Extension("edgellm.kvindex._rows", ["src/edgellm/kvindex/_rows.c"],
                  extra_compile_args=["-O2"]),
    ],
)
