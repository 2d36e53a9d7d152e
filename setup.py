"""Packages of the distribution (the rest of the metadata is in pyproject.toml).

The experiments live in the repository's top-level ``gin/`` and install as ``gnopt/gin``,
where :mod:`gnopt.train` finds them when it does not run from a checkout.
"""

from setuptools import find_packages, setup

GIN_PACKAGES = {"gnopt.gin": "gin", "gnopt.gin.base": "gin/base", "gnopt.gin.steps": "gin/steps"}

setup(
    packages=find_packages(include=["gnopt", "gnopt.*"]) + list(GIN_PACKAGES),
    package_dir=GIN_PACKAGES,
    package_data={"gnopt": ["py.typed"], **{name: ["*.gin"] for name in GIN_PACKAGES}},
)
