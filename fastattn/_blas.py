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
import sys
import threading

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
        # Setting OpenBLAS's thread count starts its pool again if it was put to rest, and the
        # new workers spin, unused by one-thread products, on the cores of the kernel about to
        # run (measured: after a change, 0.34 of a core busy while the process slept). So the
        # pool goes back to rest after each change.
        set_(1)
        quiet_other_pools()
        try:
            yield
        finally:
            set_(before)
            quiet_other_pools()
        return
    try:
        import threadpoolctl
    except ImportError:
        yield
        return
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        yield


# --- the other thread pools in the process -------------------------------------------------------
#
# A model calls fastattn between other libraries' products (NumPy's BLAS, PyTorch), back to back.
# Their thread pools do not go idle at once when a call ends: OpenBLAS's workers spin for
# 2^28 cycles (about 0.1 s; OPENBLAS_THREAD_TIMEOUT, read only when the library loads) and
# libgomp's, which runs Numba's omp threading layer, for 300,000 spins (measured: 5 ms of a core
# after each fastattn call here). On a machine with as many threads as cores a spinning pool
# takes a core from the next library's threads: h @ W then causal attention took 24 ms against
# 3.1 + 10.4 alone. So fastattn
#   - puts OpenBLAS's workers to rest before each of its kernels (``quiet_other_pools``): an
#     OpenBLAS (NumPy's, SciPy's) shuts its workers down and starts them again at its next
#     threaded call, which costs it one thread start (tens of microseconds);
#   - loads Numba's OpenMP runtime with a short spin (GOMP_SPINCOUNT=SPIN_COUNT, about 0.2 ms here)
#     when it is the first to load it and the user set neither GOMP_SPINCOUNT nor OMP_WAIT_POLICY,
#     at ``import fastattn`` (``load_openmp_runtime_early``; a dlopen, no threads started) or at
#     the first kernel (``prepare_numba_pool``); the variable is set only while the runtime
#     loads. PyTorch imported after binds to the copy already loaded (same soname): one OpenMP
#     pool for both, with the short spin. PyTorch imported before loads its own copy
#     (torch/lib/libgomp.so.1) with the default spin, which Numba's threads then share: measured
#     here, h @ W right after fastattn's causal attention took 16.4 ms instead of 8.4 (its
#     OpenBLAS threads shared a core with a spinning Numba thread), 8.6 with fastattn imported
#     first.
# Neither changes a result: they change only when threads sleep, not what any thread computes.

SPIN_COUNT = 10000
# FASTATTN_QUIET_POOLS=0 turns both off (to compare, or if a platform misbehaves).
ENABLED = os.environ.get("FASTATTN_QUIET_POOLS", "1") != "0"

_OPENBLAS_CONFIG = ("scipy_openblas_get_config64_", "scipy_openblas_get_config",
                    "openblas_get_config64_", "openblas_get_config")
_state = {"numba_pool": None, "skipped_threads": 0}
_early_runtime = []  # the OpenMP runtime loaded at import, kept so that it is never unloaded
_NUMBA_OMP_LAYERS = ("default", "omp", "threadsafe", "forksafe")
_openblas_pools = None   # [(path, config, shutdown function)], found on first use
_server_running = {}     # path -> OpenBLAS's blas_server_avail (a ctypes int), or None
_pools_lock = threading.Lock()


def _loaded_libraries() -> list[str]:
    """Paths of the shared libraries mapped into this process (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            fields = (line.split(None, 5) for line in f)
            paths = {x[5].strip() for x in fields if len(x) == 6 and x[5].startswith("/")}
    except OSError:
        return []
    return sorted(p for p in paths if ".so" in os.path.basename(p))


def _find_openblas_pools() -> list:
    """Every loaded OpenBLAS that runs its own pthreads pool and can shut it down."""
    pools = []
    for path in _loaded_libraries():
        if "openblas" not in os.path.basename(path).lower():
            continue
        try:
            lib = ctypes.PyDLL(path)  # PyDLL: the call keeps the GIL (see quiet_other_pools)
        except OSError:
            continue
        config = next((getattr(lib, n) for n in _OPENBLAS_CONFIG if hasattr(lib, n)), None)
        text = ""
        if config is not None:
            config.restype = ctypes.c_char_p
            text = (config() or b"").decode(errors="replace")
        # An OpenMP build runs on the OpenMP runtime's threads, not a pool of its own.
        if "USE_OPENMP" in text.upper() or not hasattr(lib, "blas_thread_shutdown_"):
            continue
        shutdown = lib.blas_thread_shutdown_
        shutdown.restype = ctypes.c_int
        pools.append((path, text, shutdown))
        try:  # 1 while its workers exist (OpenBLAS's own flag, read without a call)
            _server_running[path] = ctypes.c_int.in_dll(lib, "blas_server_avail")
        except ValueError:
            _server_running[path] = None
    return pools


def openblas_pools() -> list:
    global _openblas_pools
    if _openblas_pools is None:
        _openblas_pools = _find_openblas_pools()
    return _openblas_pools


def quiet_other_pools() -> bool:
    """Stop OpenBLAS's workers spinning before a fastattn kernel takes every core.

    Only while this is the process's one Python thread (fastattn's own idle workers aside):
    OpenBLAS's shutdown must not meet a product in progress on another thread (NumPy runs its products without the GIL; this call
    holds it, so no new one starts). Returns whether it was done.
    """
    if not ENABLED:
        return False
    pools = openblas_pools()
    if not pools:
        return False
    # Only the pools whose workers exist: on a decode step inside a PyTorch model NumPy's pools
    # are at rest, and listing the threads and shutting them down again took ~10 of the ~30 us
    # of each call's preamble there.
    running = [shutdown for path, _, shutdown in pools
               if _server_running.get(path) is None or _server_running[path].value]
    if not running:
        return True
    python_threads = len(sys._current_frames())
    if python_threads > 1:
        # fastattn's own worker threads (flex's pool, named "fastattn...") never run a BLAS
        # product. (Counted only here: listing the threads on every call costs microseconds.)
        own = sum(1 for t in threading.enumerate()
                  if t.name.startswith("fastattn") and t is not threading.current_thread())
        if python_threads - own > 1:
            _state["skipped_threads"] += 1
            return False
    with _pools_lock:
        for shutdown in running:
            shutdown()
    return True


def load_openmp_runtime_early() -> bool:
    """At ``import fastattn``: load the OpenMP runtime of Numba's omp layer with the short spin,
    so that PyTorch imported afterwards shares it rather than loading its own with the default
    spin (libgomp reads GOMP_SPINCOUNT only when it loads). Nothing when the user set the spin,
    chose another threading layer or turned quieting off, when an OpenMP runtime is already
    loaded, or off Linux. Returns whether it loaded the runtime."""
    if not ENABLED or not sys.platform.startswith("linux") or "torch" in sys.modules:
        return False
    if any(v in os.environ for v in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")):
        return False
    if os.environ.get("NUMBA_THREADING_LAYER", "default") not in _NUMBA_OMP_LAYERS:
        return False
    if _libgomp_paths():
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    try:
        _early_runtime.append(ctypes.CDLL("libgomp.so.1"))
    except OSError:  # no system libgomp: Numba's omp layer is unavailable too
        return False
    finally:
        del os.environ["GOMP_SPINCOUNT"]
    return True


def _libgomp_paths() -> list[str]:
    """The OpenMP runtimes (libgomp) loaded in this process."""
    return [p for p in _loaded_libraries() if os.path.basename(p).startswith("libgomp")]


def _numba_omp_library_loaded() -> bool:
    # Numba's omp layer links libgomp.so.1.0.0; PyTorch ships its own copy, torch/lib/libgomp.so.1.
    return any(os.path.basename(p).startswith("libgomp.so") and "torch" not in p
               for p in _libgomp_paths())


def prepare_numba_pool() -> str:
    """Start Numba's threads, with a short OpenMP spin when that is ours to choose; says what
    was done (once per process; later calls return the first answer)."""
    if _state["numba_pool"] is not None:
        return _state["numba_pool"]
    import numba
    from numba.np.ufunc import parallel

    how = None
    layer = str(numba.config.THREADING_LAYER)
    if not ENABLED:
        how = "FASTATTN_QUIET_POOLS=0: Numba's threads left with their default spin"
    elif parallel._is_initialized:
        how = "Numba's threads were already started: their spin is left as it is"
    elif layer not in _NUMBA_OMP_LAYERS:
        how = f"NUMBA_THREADING_LAYER={layer}: nothing to set"
    elif any(v in os.environ for v in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")):
        how = "GOMP_SPINCOUNT/OMP_WAIT_POLICY set by the user: kept"
    elif not _early_runtime and _numba_omp_library_loaded():
        how = "libgomp was already loaded by another library: its spin is left as it is"
    elif not _early_runtime and _libgomp_paths():
        how = ("PyTorch's libgomp was loaded first (torch imported before fastattn): Numba's "
               "threads share it with its default spin; import fastattn first, or set "
               "GOMP_SPINCOUNT, for a short one")
    if how is not None:
        with contextlib.suppress(Exception):
            parallel._launch_threads()
        _state["numba_pool"] = how
        return how
    if _early_runtime:  # loaded with the short spin already
        parallel._launch_threads()
    else:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
        try:
            parallel._launch_threads()
        finally:
            del os.environ["GOMP_SPINCOUNT"]
    layer = numba.threading_layer()
    when = ("at import " if _early_runtime else "")
    shared = "; PyTorch imported after fastattn shares it" if _early_runtime else ""
    _state["numba_pool"] = (f"libgomp loaded {when}with GOMP_SPINCOUNT={SPIN_COUNT} (short spin "
                            f"after each kernel{shared})" if layer == "omp" else
                            f"threading layer {layer}: nothing to set")
    return _state["numba_pool"]


def describe_pools() -> dict:
    """The thread pools in this process and what fastattn did about them (for ``info``)."""
    out = {}
    pools = openblas_pools()
    if not ENABLED:
        done = "left spinning: FASTATTN_QUIET_POOLS=0"
    else:
        done = "its spin stopped before each fastattn kernel"
        if _state["skipped_threads"]:
            done += (f" (not done {_state['skipped_threads']} times: other Python threads were "
                     f"running)")
    for path, config, _ in pools:
        version = config.split()[1] if len(config.split()) > 1 else "?"
        out[f"pool {os.path.basename(path)}"] = f"OpenBLAS {version} worker threads: {done}"
    if not pools:
        out["pool OpenBLAS"] = "none with a pthreads pool of its own loaded"
    gomp = _libgomp_paths()
    torch_shares = "torch" in sys.modules and not any("torch" in p for p in gomp)
    for path in gomp:
        whose = "PyTorch's OpenMP runtime, left as it is" if "torch" in path else \
            "the OpenMP runtime of Numba's omp layer" + (
                " and of PyTorch (one pool: PyTorch loaded after it)" if torch_shares else "")
        out[f"pool {os.path.basename(path)}"] = f"{whose}: {path}"
    out["numba pool"] = _state["numba_pool"] or "not started yet"
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            out["pool torch intra-op"] = f"{torch.get_num_threads()} threads"
    return out
