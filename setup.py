import os
import sys

from setuptools import setup

# Run from here, this directory is on the path, and its kernels/ (installed as fastattn.kernels)
# would stand in for an installed package named `kernels`: Hugging Face's (which transformers
# 5.25 brings) hooks into egg_info and imports kernels._internals, which failed the build.
# Nothing below imports from this directory by name.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

setup(
    name="fastattn",
    version="0.1.0",
    description="Fused, numerically stable attention kernels for NumPy, compiled with Numba "
                "(CPU and CUDA)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    # The kernels live in kernels/ at the top of the repository and install as fastattn.kernels,
    # so nothing named `kernels` lands at the top level of site-packages.
    packages=["fastattn", "fastattn.bench", "fastattn.integrations", "fastattn.kernels",
              "fastattn.kernels.cpu", "fastattn.kernels.cuda"],
    package_dir={"fastattn": "fastattn", "fastattn.kernels": "kernels"},
    install_requires=["numpy>=1.24", "scipy>=1.10", "numba>=0.59"],
    extras_require={
        # The tests of optional features run in CI: the test extra brings their packages.
        "test": ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4", "matplotlib>=3.6",
                 "dask[array]>=2024.1", "distributed>=2024.1", "ml_dtypes>=0.3",
                 # test_cli builds a wheel with --no-build-isolation: the setuptools of a fresh
                 # Python 3.11 venv (65) has no bdist_wheel without the wheel package.
                 "setuptools>=70.1"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.6", "threadpoolctl>=3"],
        "cuda": ["numba-cuda>=0.20"],
        # ml_dtypes: bfloat16 tensors reach the kernels in place as its NumPy bfloat16
        "torch": ["torch>=2.1", "ml_dtypes>=0.3"],
        # transformers: the mask interface as of 5.24 (tested)
        "hf": ["torch>=2.1", "ml_dtypes>=0.3", "transformers>=5.24"],
        "dask": ["dask[array]>=2024.1", "distributed>=2024.1"],
    },
    entry_points={"console_scripts": ["fastattn=fastattn.__main__:main"]},
)
