"""pytest-benchmark suite: fastattn against NumPy, SciPy and PyTorch (not part of the tests).

    python -m pytest bench --benchmark-only            # everything (several minutes)
    python -m pytest bench --benchmark-only -m quick   # the quick subset (under 2 minutes)

Add ``--benchmark-columns=min,median,max,rounds --benchmark-sort=name`` to taste, or
``--benchmark-json=FILE`` to keep the figures. Each benchmark group is one problem; its members
are the implementations (see ``fastattn/_bench_impls.py``).
"""
import os
import sys

import pytest

try:
    import fastattn  # noqa: F401
except ImportError:  # run from a source checkout without installing: use the tree
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastattn.bench import impls  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "quick: the quick subset of the benchmarks (pytest bench -m quick)")


@pytest.fixture(scope="session", autouse=True)
def torch_on_numba_threads():
    """PyTorch on as many threads as Numba, so that the comparison is like for like."""
    if impls.available("torch") is not None or impls.available("numba") is not None:
        yield
        return
    import numba
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(numba.get_num_threads())
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def problem_inputs():
    """Inputs and the plain formula's answer of each problem, made once per session."""
    cache = {}

    def get(problem):
        if problem not in cache:
            # One problem at a time: the big ones hold hundreds of MiB.
            cache.clear()
            arrays = impls.make_inputs(problem)
            expected = None
            if problem.op != "mha":
                expected = impls.prepare("formula", problem, arrays)()
            cache[problem] = arrays, expected
        return cache[problem]
    return get
