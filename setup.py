"""Build script.

Package metadata lives in pyproject.toml. Native extensions from csrc/ are
added here once they exist (see csrc/README.md); until then this is a plain
Python package.
"""

from setuptools import setup

setup()
