"""Which backends exist, which are usable here, and which one a call runs on."""
from __future__ import annotations

import functools
import importlib.util

import numpy as np

BACKENDS = ("numpy", "numba", "cuda")
CHOICES = ("auto",) + BACKENDS


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run here (missing package, no GPU); the message says why."""


def _numba_cuda_installed() -> bool:
    try:
        from importlib.metadata import version
        version("numba-cuda")
        return True
    except Exception:
        return False


def _cuda_driver_loads() -> bool:
    import ctypes
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll", "libcuda.dylib"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


@functools.lru_cache(maxsize=None)
def cuda_unavailable_reason() -> str | None:
    """None when a CUDA GPU is usable, else exactly what is missing. Never compiles a kernel."""
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed"
    if not _numba_cuda_installed():
        return "numba-cuda is not installed (pip install 'fastattn[cuda]')"
    try:
        from numba import cuda
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"numba.cuda cannot be imported: {exc}"
    try:
        if not cuda.is_available():
            if not _cuda_driver_loads():
                return ("numba-cuda is installed, but no NVIDIA driver was found (libcuda); for "
                        "testing without a GPU set NUMBA_ENABLE_CUDASIM=1")
            return "numba-cuda and the NVIDIA driver are installed, but the driver sees no GPU"
    except Exception as exc:  # pragma: no cover - driver errors
        return f"the CUDA driver failed: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def numba_unavailable_reason() -> str | None:
    # Cached: every call resolves its backend, and a module search costs microseconds.
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install numba)"
    return None


def backends() -> list[str]:
    """The backends usable here, fastest first: e.g. ``['numba', 'numpy']``."""
    usable = []
    if cuda_unavailable_reason() is None:
        usable.append("cuda")
    if numba_unavailable_reason() is None:
        usable.append("numba")
    usable.append("numpy")
    return usable


def is_device_array(x) -> bool:
    # Numba device arrays say so with __cuda_ndarray__ (the CUDA simulator's expose no
    # __cuda_array_interface__); CuPy arrays and PyTorch CUDA tensors by the interface.
    if type(x) is np.ndarray:
        return False
    if getattr(x, "__cuda_ndarray__", False):
        return True
    return hasattr(x, "__cuda_array_interface__") and not hasattr(x, "__array_interface__")


def resolve(backend, *arrays) -> str:
    """The backend a call runs on: the one named, or for "auto" the fastest for these inputs."""
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, CHOICES))}; got {backend!r}")
    on_device = any(is_device_array(a) for a in arrays if a is not None)
    if backend == "auto":
        if on_device:
            backend = "cuda"
        else:
            backend = "numba" if numba_unavailable_reason() is None else "numpy"
    if backend == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"backend 'cuda' is not usable here: {reason}")
    elif on_device:
        raise TypeError(f"backend {backend!r} takes NumPy arrays; got a GPU array (use "
                        f"backend='cuda' or 'auto')")
    elif backend == "numba":
        reason = numba_unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"backend 'numba' is not usable here: {reason}")
    return backend


def module(name: str):
    """The module implementing a resolved non-NumPy backend."""
    if name == "numba":
        from . import _numba
        return _numba
    if name == "cuda":
        try:
            from . import _cuda
        except ImportError as exc:
            raise BackendUnavailableError(f"backend 'cuda' cannot be loaded: {exc}") from None
        return _cuda
    raise ValueError(name)
