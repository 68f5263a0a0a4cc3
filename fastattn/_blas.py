"""Keep SciPy's BLAS single-threaded while a parallel Numba kernel runs.

``np.dot`` inside jitted code calls SciPy's BLAS. The kernels already spread their work over all
cores with ``prange``; a multi-threaded BLAS inside would oversubscribe them (numba issue 6933)
and make results depend on the thread count. So we set BLAS to one thread around the call and
restore it afterwards.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import os

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_", "openblas_set_num_threads")
_GETTERS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
            "openblas_get_num_threads64_", "openblas_get_num_threads")


def _find_scipy_openblas():
    """(get, set, path) for the OpenBLAS that SciPy's wheel bundles, or None."""
    try:
        import scipy
    except ImportError:
        return None
    libs_dir = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs")
    for path in sorted(glob.glob(os.path.join(libs_dir, "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        get = next((getattr(lib, n) for n in _GETTERS if hasattr(lib, n)), None)
        set_ = next((getattr(lib, n) for n in _SETTERS if hasattr(lib, n)), None)
        if get is not None and set_ is not None:
            get.restype = ctypes.c_int
            set_.argtypes = [ctypes.c_int]
            return get, set_, path
    return None


_openblas = _find_scipy_openblas()


def describe() -> str:
    """How the BLAS thread count is controlled here (for ``python -m fastattn info``)."""
    if _openblas is not None:
        return f"SciPy's OpenBLAS ({os.path.basename(_openblas[2])}), set to 1 thread per call"
    try:
        import threadpoolctl  # noqa: F401
        return "threadpoolctl limits BLAS to 1 thread per call"
    except ImportError:
        return ("unknown BLAS: not limited; set OPENBLAS_NUM_THREADS=1 or MKL_NUM_THREADS=1 "
                "to avoid oversubscription")


@contextlib.contextmanager
def single_threaded_blas():
    if _openblas is not None:
        get, set_, _ = _openblas
        before = get()
        set_(1)
        try:
            yield
        finally:
            set_(before)
        return
    try:
        import threadpoolctl
    except ImportError:
        yield
        return
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        yield
