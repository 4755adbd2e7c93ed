# Metadata lives in pyproject.toml. This file exists for the CUDA extension of the kernels
# issue (csrc/), which setuptools can only build from setup.py; until then it is a plain shim.
from setuptools import setup

setup()
