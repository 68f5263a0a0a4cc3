"""``python -m fastattn info``: what a user pastes into a bug report."""
from __future__ import annotations

import argparse
import os
import platform
import sys


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception:
        return "not installed"
    return getattr(module, "__version__", "installed")


def collect() -> dict:
    import fastattn
    from . import _backends, _blas

    if _backends.numba_unavailable_reason() is None:
        _blas.prepare_numba_pool()  # before anything starts Numba's threads or imports torch

    info = {
        "fastattn": fastattn.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
    }
    for name in ("numpy", "scipy", "numba", "llvmlite", "torch"):
        info[name] = _version(name)
    try:
        from importlib.metadata import version
        info["numba-cuda"] = version("numba-cuda")
    except Exception:
        info["numba-cuda"] = "not installed"
    info["backends"] = ", ".join(_backends.backends())
    if _backends.numba_unavailable_reason() is None:
        import numba
        info["numba threads"] = numba.get_num_threads()
        info["numba threading layer"] = _threading_layer()
    info["blas threads in kernels"] = _blas.describe()
    info.update(_blas.describe_pools())  # after the threading layer started: what it did
    reason = _backends.cuda_unavailable_reason()
    info["gpu"] = _gpu_name() if reason is None else f"none ({reason})"
    for var in ("NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "NUMBA_ENABLE_CUDASIM",
                "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                "OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY",
                "FASTATTN_QUIET_POOLS"):
        if var in os.environ:
            info[var] = os.environ[var]
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _threading_layer() -> str:
    import numba
    import numpy as np

    @numba.njit(parallel=True)
    def touch(x):  # the layer is chosen at the first parallel launch
        for i in numba.prange(x.shape[0]):
            x[i] = i

    try:
        touch(np.empty(2))
        return numba.threading_layer()
    except Exception as exc:  # pragma: no cover
        return f"unknown ({exc})"


def _gpu_name() -> str:
    from numba import cuda
    device = cuda.get_current_device()
    if not hasattr(device, "name"):  # NUMBA_ENABLE_CUDASIM=1: the simulator's device
        return "Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
    name = device.name.decode() if isinstance(device.name, bytes) else device.name
    return f"{name} (compute capability {device.compute_capability[0]}.{device.compute_capability[1]})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn info", description=__doc__)
    parser.parse_args(argv)
    for key, value in collect().items():
        print(f"{key:24} {value}")
    return 0
