"""How the benchmarks measure: time, extra memory, the machine's matrix-product peak, the header.

Time: every implementation of a case is warmed up first (JIT compilation, thread pools), then
the calls are interleaved (one call of each implementation per round) so that a change in the
machine's load during the case hits them all alike; each figure is the median of its calls.

Memory: the extra memory of one call is the growth of the process's peak resident set (VmHWM)
during the call, less the output it returns, in a fresh worker process started with glibc told to
map every allocation above 64 KiB afresh and to give freed memory back (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_), so no call hides its memory in pages an earlier call left behind. The
peak is reset before each call by writing 5 to /proc/self/clear_refs (Linux). This sees every
allocation that the call touches: NumPy's, Numba's compiled code's, PyTorch's, BLAS buffers and
thread stacks alike (tracemalloc sees only what goes through Python's allocators, which misses
PyTorch's and BLAS's). Without /proc (macOS, Windows) memory is not measured.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import numpy as np

from . import impls

MiB = 1024.0 * 1024.0


def child_pythonpath(env: dict) -> str:
    """PYTHONPATH for a child process that must import this fastattn: the directory that holds
    the package, then the caller's path (not the package directory itself: its torch.py would
    shadow PyTorch in the child)."""
    parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.pathsep.join(filter(None, [parent, env.get("PYTHONPATH")]))


# --- time --------------------------------------------------------------------------------------

SETTLE_S = 0.15
# Calls shorter than this get an untimed call right before each timed one (see time_interleaved).
REWARM_BELOW_S = 0.1


def time_interleaved(calls: dict, min_runs: int, min_time: float, max_runs: int,
                     max_time: float = float("inf"), on_call=None) -> dict:
    """Median seconds per call of each named callable, and the number of calls (or "skipped").

    Each callable is called once to warm up (not counted; its time sets how many calls fit in
    ``min_time``), then the callables take turns, so that a change in the machine's load hits
    them all alike. Before each turn the threads of the previous one are given ``SETTLE_S`` to go
    idle: OpenBLAS's threads spin for about 0.1 s after a call, and would otherwise steal the
    cores from whichever implementation is timed next. A thread pool that has gone idle is slow
    to start again, though: on this project's virtual machine a parallel job of 4.6 ms took
    5.5-10 ms after 0.05 s or more of idling (a serial one did not slow down, so it is most
    likely the idle virtual CPU being woken), which would swamp calls of a few ms. So a callable
    whose warm-up took less than ``REWARM_BELOW_S`` is called once more, untimed, right before
    each timed call: its figure is the time of a call made while the machine is busy with it, as
    in a model's forward loop. A callable whose ``min_runs`` calls would take longer than
    ``max_time`` gets fewer, but at least 3 (or ``min_runs`` if smaller). ``on_call(done,
    planned, name)`` is told of each call (for a progress bar).
    """
    first, failed = {}, {}
    for name, fn in list(calls.items()):
        if on_call is not None:
            on_call(0, 1, f"{name} warm-up")
        start = time.perf_counter()
        try:
            fn()
        except impls.Unavailable as exc:
            failed[name] = {"skipped": str(exc)}
            continue
        except Exception as exc:  # an implementation that fails here is reported, not fatal
            failed[name] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
            continue
        first[name] = time.perf_counter() - start
    calls = {name: fn for name, fn in calls.items() if name in first}
    runs = {}
    for name, t in first.items():
        n = int(min(max_runs, max(min_runs, np.ceil(min_time / max(t, 1e-9)))))
        if n * t > max_time:
            n = max(min(3, min_runs), int(max_time / t))
        runs[name] = n
    planned = sum(runs[name] * max(first[name], 1e-6) for name in calls)
    done = 0.0
    times = {name: [] for name in calls}
    for r in range(max(runs.values(), default=0)):
        for name, fn in calls.items():
            if r < runs[name]:
                if on_call is not None:
                    on_call(done, planned, f"{name} {r + 1}/{runs[name]}")
                time.sleep(SETTLE_S)
                if first[name] < REWARM_BELOW_S:
                    fn()
                start = time.perf_counter()
                result = fn()
                times[name].append(time.perf_counter() - start)
                del result  # freeing the output is not part of the call's time
                done += max(first[name], 1e-6)
    results = {name: {"median_s": statistics.median(ts), "min_s": min(ts), "runs": len(ts),
                      "first_call_s": first[name]}
               for name, ts in times.items()}
    results.update(failed)
    return results


def time_back_to_back(sequences: dict, calls: int = 20, rounds: int = 3, warmup: int = 2,
                      on_call=None) -> dict:
    """Median seconds of each named sequence of callables, called back to back as in a model.

    Unlike :func:`time_interleaved` nothing settles between calls: whatever thread pools the
    previous call left spinning are still spinning. A sequence (a list of callables, called in
    order) runs ``warmup`` times untimed, then ``calls`` times timed, back to back; the sequences
    take turns for ``rounds`` rounds, so that a change in load hits them all alike. Returns
    {name: {"median_s", "min_s", "runs"}} (``runs`` = calls * rounds, the calls of the median).
    """
    times = {name: [] for name in sequences}
    for r in range(rounds):
        for name, fns in sequences.items():
            if on_call is not None:
                on_call(r / rounds, f"{name} round {r + 1}/{rounds}")
            for i in range(warmup + calls):
                start = time.perf_counter()
                for fn in fns:
                    result = fn()
                elapsed = time.perf_counter() - start
                del result
                if i >= warmup:
                    times[name].append(elapsed)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "runs": len(ts)}
            for name, ts in times.items()}


def gemm_peak(dtype: str = "float32", n: int = 4096, runs: int = 5) -> dict:
    """GFLOP/s of NumPy's matrix product (sgemm for float32, dgemm for float64), best of ``runs``.

    It runs on the BLAS threads in force (set by the caller), in the same run as the benchmarks.
    """
    gemm_dtype = np.float64 if dtype == "float64" else np.float32
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n), dtype=gemm_dtype)
    b = rng.standard_normal((n, n), dtype=gemm_dtype)
    out = np.empty((n, n), gemm_dtype)
    np.matmul(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    name = "dgemm" if gemm_dtype == np.float64 else "sgemm"
    return {"name": name, "n": n, "runs": runs, "best_s": best, "gflops": 2.0 * n ** 3 / best / 1e9}


# --- threads -----------------------------------------------------------------------------------

@contextlib.contextmanager
def threads_limited(threads: int | None):
    """Run Numba, NumPy/SciPy's BLAS and PyTorch on ``threads`` threads (None: their defaults)."""
    if threads is None:
        yield
        return
    import numba

    if threads > numba.config.NUMBA_NUM_THREADS:
        raise SystemExit(f"--threads {threads}: Numba was started with at most "
                         f"{numba.config.NUMBA_NUM_THREADS} threads (set NUMBA_NUM_THREADS)")
    from .. import _blas

    _blas.prepare_numba_pool()  # before Numba's threads start: they start as fastattn's would
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    torch = sys.modules.get("torch")
    torch_before = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(threads)
    try:
        try:
            import threadpoolctl
        except ImportError:
            yield
        else:
            with threadpoolctl.threadpool_limits(threads, user_api="blas"):
                yield
    finally:
        numba.set_num_threads(before)
        if torch:
            torch.set_num_threads(torch_before)


# --- memory ------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1))


def memory_supported() -> str | None:
    """None when extra memory can be measured here, else why not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
    except (OSError, AttributeError):
        return "needs Linux's /proc/self/clear_refs and VmHWM"
    return None


def _trim():
    gc.collect()
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def extra_memory_of_call(fn) -> tuple[int, float]:
    """(bytes, seconds): the peak RSS growth of one call of ``fn`` less the result it returns."""
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set becomes the current one
    before = _status_kib("VmHWM")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    extra = (peak - before) * 1024 - impls.nbytes(result)
    del result
    return extra, seconds


def _worker_main():
    """Entry point of the fresh memory worker: a JSON job on stdin, one JSON line per case out."""
    job = json.loads(sys.stdin.read())
    if any(case["impl"] == "torch" for case in job["cases"]):
        with contextlib.suppress(ImportError):
            import torch  # noqa: F401  (before threads_limited, so it sets torch's threads too)
    warmed = set()
    with threads_limited(job["threads"]):
        for case in job["cases"]:
            problem = impls.Problem(**case["problem"])
            impl = case["impl"]
            record = {"key": case["key"]}
            try:
                # Warm up on a small problem of the same kind: compiles, starts thread pools.
                kind = (impl, problem.op, problem.causal, problem.mask, problem.gqa)
                if kind not in warmed:
                    small = problem.with_(length=min(problem.length, 256),
                                          kv_length=min(problem.S, 256))
                    impls.prepare(impl, small, impls.make_inputs(small))()
                    warmed.add(kind)
                arrays = impls.make_inputs(problem)
                fn = impls.prepare(impl, problem, arrays)
                extra, seconds = extra_memory_of_call(fn)
                record.update(extra_bytes=extra, seconds=seconds)
            except impls.Unavailable as exc:
                record["skipped"] = str(exc)
            except MemoryError:
                record["skipped"] = "out of memory"
            except Exception as exc:
                record["skipped"] = f"failed: {type(exc).__name__}: {exc}"
            print("RESULT " + json.dumps(record), flush=True)


def measure_memory(cases: list[dict], threads: int | None, on_result=None) -> dict:
    """Extra memory of one call for each case, measured in one fresh worker process.

    ``cases``: dicts with "key", "impl" and "problem" (a :class:`Problem` as a dict of its
    fields). Returns {key: record}; a record holds "extra_bytes" and "seconds", or "skipped".
    """
    reason = memory_supported()
    if reason is not None:
        return {c["key"]: {"skipped": reason} for c in cases}
    env = dict(os.environ)
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               MALLOC_TOP_PAD_="0")
    env["PYTHONPATH"] = child_pythonpath(env)
    job = json.dumps({"threads": threads, "cases": cases})
    proc = subprocess.Popen(
        [sys.executable, "-c", "from fastattn.bench.measure import _worker_main; _worker_main()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    proc.stdin.write(job)
    proc.stdin.close()
    results = {}
    for line in proc.stdout:
        if line.startswith("RESULT "):
            record = json.loads(line[len("RESULT "):])
            results[record.pop("key")] = record
            if on_result is not None:
                on_result()
    stderr = proc.stderr.read()
    proc.wait()
    for c in cases:
        if c["key"] not in results:
            tail = stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            results[c["key"]] = {"skipped": f"the memory worker failed: {tail[0]}"}
    return results


# --- the pools' quieting, on and off -------------------------------------------------------------

def _standalone_main():
    """Entry point of a standalone-timing child: a JSON job on stdin (threads, min_runs, cases of
    "key", "impl", "problem"), the cases timed as the attention benchmark times them
    (:func:`time_interleaved`, settle time before each call), one RESULT line out."""
    job = json.loads(sys.stdin.read())
    if any(case["impl"] == "torch" for case in job["cases"]):
        with contextlib.suppress(ImportError):
            import torch  # noqa: F401  (after fastattn, as the bench imports them)
    with threads_limited(job["threads"]):
        calls = {}
        for case in job["cases"]:
            problem = impls.Problem(**case["problem"])
            calls[case["key"]] = impls.prepare(case["impl"], problem, impls.make_inputs(problem))
        timing = time_interleaved(calls, job["min_runs"], 0.0, max_runs=job["min_runs"])
    from .. import _blas
    print("RESULT " + json.dumps({"quieting": _blas.ENABLED,
                                  "times": {k: t.get("median_s") for k, t in timing.items()}}),
          flush=True)


def standalone_quieting_on_off(cases: list[dict], threads: int | None, rounds: int = 3,
                               min_runs: int = 5, on_round=None) -> dict:
    """The standalone times of ``cases`` (dicts of "key", "impl", "problem") with fastattn's
    quieting of the other pools on and off (``FASTATTN_QUIET_POOLS``), in one run: each round
    starts one fresh process of each kind, in a random order, and times every case there as the
    attention benchmark does. The setting is read when fastattn is imported (the OpenMP
    runtime's spin is fixed when it loads), so on and off need processes of their own.

    Returns {key: {"on": seconds, "off": seconds, "ratio": on / off, "ratios": [...],
    "rounds": n}}: the times are the medians of the rounds' medians; "ratio" is the median of
    the rounds' own on / off ratios (the two processes of a round run one after the other, so a
    drift in the machine's speed between rounds cancels), "ratios" each round's. Or
    {key: {"skipped": why}}.
    """
    import random

    env = dict(os.environ)
    env["PYTHONPATH"] = child_pythonpath(env)
    job = json.dumps({"threads": threads, "min_runs": min_runs, "cases": cases})
    times = {c["key"]: {"on": [None] * rounds, "off": [None] * rounds} for c in cases}
    failure = None
    for r in range(rounds):
        for setting in random.sample(["on", "off"], 2):
            if on_round is not None:
                on_round(r, rounds, setting)
            child_env = dict(env, FASTATTN_QUIET_POOLS="1" if setting == "on" else "0")
            proc = subprocess.run(
                [sys.executable, "-c",
                 "from fastattn.bench.measure import _standalone_main; _standalone_main()"],
                input=job, env=child_env, capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not lines:
                tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                failure = f"the timing process failed: {tail[0]}"
                continue
            result = json.loads(lines[-1][len("RESULT "):])
            if result["quieting"] != (setting == "on"):  # the child must have read the setting
                failure = f"the timing process ignored FASTATTN_QUIET_POOLS ({setting})"
                continue
            for key, seconds in result["times"].items():
                times[key][setting][r] = seconds
    results = {}
    for key, t in times.items():
        pairs = [(on, off) for on, off in zip(t["on"], t["off"]) if on and off]
        if pairs:
            ratios = [on / off for on, off in pairs]
            results[key] = {"on": statistics.median(on for on, _ in pairs),
                            "off": statistics.median(off for _, off in pairs),
                            "ratio": statistics.median(ratios), "ratios": ratios,
                            "rounds": len(pairs)}
        else:
            results[key] = {"skipped": failure or "no time measured"}
    return results


# --- JIT ---------------------------------------------------------------------------------------

_FIRST_CALL = """
import json, time
start = time.perf_counter()
import numpy as np
import fastattn
imported = time.perf_counter()
q = np.ones((1, 1, 256, 64), np.{dtype})
fastattn.scaled_dot_product_attention(q, q, q, backend="numba")
called = time.perf_counter()
print("RESULT " + json.dumps({{"import_s": imported - start, "first_call_s": called - imported}}))
"""


def first_call_in_new_process(dtype: str = "float32", cold: bool = False) -> dict:
    """Seconds to import fastattn and make its first attention call in a new Python process.

    ``cold``: with an empty Numba cache (a temporary NUMBA_CACHE_DIR), so the kernels compile;
    otherwise they load from the cache as a user's second run would (run once first, so the
    cache is filled). Returns {"import_s", "first_call_s"} or {"skipped": why}.
    """
    import tempfile

    env = dict(os.environ)
    env["PYTHONPATH"] = child_pythonpath(env)
    code = _FIRST_CALL.format(dtype="float32" if dtype == "float16" else dtype)
    with tempfile.TemporaryDirectory() as cache:
        if cold:
            env["NUMBA_CACHE_DIR"] = cache
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    return {"skipped": f"failed: {tail[0]}"}


# --- the machine -------------------------------------------------------------------------------

def _cpu_model_and_flags() -> tuple[str, str]:
    model, flags = platform.processor() or "unknown", ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            text = f.read()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        model = m.group(1).strip() if m else model
        m = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
        if m:
            have = set(m.group(1).split())
            simd = [f for f in ("avx2", "fma", "avx512f") if f in have]
            flags = " ".join(simd) + ("" if "avx512f" in have else " (no avx512)")
    return model, flags


def _blas_pools() -> list[str]:
    try:
        import threadpoolctl
    except ImportError:
        return ["(install threadpoolctl to see which BLAS and kernel NumPy uses)"]
    pools = []
    for pool in threadpoolctl.threadpool_info():
        if pool.get("user_api") != "blas":
            continue
        pools.append(f"{pool.get('internal_api')} {pool.get('version')} "
                     f"({pool.get('architecture') or '?'} kernel, {pool.get('num_threads')} "
                     f"threads) {os.path.basename(pool.get('filepath', ''))}")
    return pools or ["none found by threadpoolctl"]


def system_header(threads: int | None) -> dict:
    """What makes figures comparable: CPU, threads, threading layer, BLAS and versions."""
    from .. import info

    base = info.collect()
    model, flags = _cpu_model_and_flags()
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": model + (f" [{flags}]" if flags else ""),
        "cores": os.cpu_count(),
        "threads": base.get("numba threads"),
        "numba threading layer": base.get("numba threading layer"),
        "blas": _blas_pools(),
        "blas threads in kernels": base.get("blas threads in kernels"),
    }
    for name in ("fastattn", "python", "numpy", "scipy", "numba", "llvmlite", "torch"):
        header[name] = base.get(name)
    torch = sys.modules.get("torch")
    if torch is not None:
        header["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads)"
    header["gpu"] = base.get("gpu")
    header["load average at the start"] = " ".join(f"{x:.2f}" for x in os.getloadavg()) \
        if hasattr(os, "getloadavg") else "n/a"
    slow = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ]
    if slow:
        header["warning"] = (f"{' and '.join(slow)} set: NumPy's BLAS may run slower than it can; "
                             f"unset them for this command")
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if var in os.environ:
            header[var] = os.environ[var]
    return header


def busy_warning() -> str | None:
    """A warning when other work is running (load average above half the cores): the figures of
    this run will be low, and its ratios noisier."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores / 2:
        return None
    return (f"the machine is busy (load average {load:.2f} on {cores} cores): other work is "
            f"taking the cores, so the figures of this run will be low; stop it and rerun for "
            f"figures like the README's")


# --- memory read bandwidth ---------------------------------------------------------------------

def _read_kernel():
    import numba

    @numba.njit(parallel=True, fastmath={"reassoc", "nsz", "contract", "arcp"}, cache=False)
    def read_all(a, chunks):
        # A read-only pass: the sum of every element, chunk by chunk on the threads (the sums
        # are returned, so the reads cannot be dropped).
        n = a.shape[0]
        sums = np.zeros(chunks, a.dtype)
        for c in numba.prange(chunks):
            s = a.dtype.type(0)
            for i in range(c * n // chunks, (c + 1) * n // chunks):
                s += a[i]
            sums[c] = s
        return sums

    return read_all


def read_bandwidth(mib: int = 512, runs: int = 5) -> dict:
    """This machine's memory read bandwidth on the current threads: the best of ``runs``
    read-only passes over a ``mib`` MiB float32 array (far larger than any cache), in GB/s.
    The figure decoding from a KV cache is judged against: it reads every key and value once."""
    read_all = _read_kernel()
    a = np.ones(int(mib * MiB) // 4, np.float32)
    read_all(a[:1024], 64)  # compile
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        read_all(a, 256)
        best = min(best, time.perf_counter() - start)
    return {"mib": mib, "runs": runs, "best_s": best, "gbs": a.nbytes / best / 1e9}
