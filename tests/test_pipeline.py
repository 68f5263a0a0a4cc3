"""fastattn between other libraries' calls: the other thread pools quieted, the layer's
projections on Numba's threads, and the bench's pipeline case."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastattn
from fastattn import _blas, mha, reference
from fastattn.bench import cli, impls, measure

from conftest import assert_matches_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a pipeline computes, printed as digests of the exact bytes: a NumPy product before and
# after fastattn's calls, attention in float32 and float64, the layer on the numba backend.
_PIPELINE = """
import hashlib, numpy as np, fastattn
rng = np.random.default_rng(0)
h = rng.standard_normal((256, 192), dtype=np.float32)  # large enough for OpenBLAS's threads
w = rng.standard_normal((192, 256), dtype=np.float32)
outs = [h @ w]
for dtype in (np.float32, np.float64):
    q, k, v = (rng.standard_normal((2, 3, 70, 16)).astype(dtype) for _ in range(3))
    outs.append(fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="numba"))
    outs.append(h @ w)
    layer = fastattn.MultiHeadAttention(32, 4, dtype=dtype, seed=1)
    x = rng.standard_normal((2, 33, 32)).astype(dtype)
    outs.append(layer(x, is_causal=True, backend="numba")[0])
    outs.append(h.astype(dtype) @ w.astype(dtype))
from fastattn import _blas
print("RESULT", " ".join(hashlib.sha256(o.tobytes()).hexdigest()[:16] for o in outs))
print("POOL", _blas.prepare_numba_pool())
"""


def _run(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "FASTATTN_QUIET_POOLS"):
        env.pop(name, None)
    env.update(env_changes)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def _line(proc, tag: str) -> str:
    return next(line for line in proc.stdout.splitlines() if line.startswith(tag + " "))


# --- results do not change ---------------------------------------------------------------------

def test_quieting_the_pools_leaves_every_result_bit_identical():
    on = _run(_PIPELINE)
    off = _run(_PIPELINE, FASTATTN_QUIET_POOLS="0")
    assert "GOMP_SPINCOUNT" in _line(on, "POOL") or "already" in _line(on, "POOL")
    assert "FASTATTN_QUIET_POOLS=0" in _line(off, "POOL")
    assert _line(on, "RESULT") == _line(off, "RESULT")
    assert len(_line(on, "RESULT").split()) == 1 + 9


def test_numpy_products_are_unchanged_after_the_openblas_workers_are_shut_down():
    # In a fresh process with one Python thread, as a user's script: the whole test session has
    # other threads (Dask's, flex's pool) by the time this runs, and then nothing is shut down.
    proc = _run("""
import numpy as np
from fastattn import _blas
rng = np.random.default_rng(2)
a = rng.standard_normal((300, 200), dtype=np.float32)
b = rng.standard_normal((200, 250), dtype=np.float32)
before = a @ b
done = []
if _blas.openblas_pools():
    done.append(_blas.quiet_other_pools())
    done.append(np.array_equal(a @ b, before))  # NumPy's BLAS starts its workers again
    done.append(_blas.quiet_other_pools())
    done.append(_blas.quiet_other_pools())  # twice in a row: nothing to stop the second time
    done.append(np.array_equal(a @ b, before))
print("POOLS", len(_blas.openblas_pools()), "DONE", all(done), len(done))
""")
    pools, _, done, count = _line(proc, "POOLS").split()[1:]
    if pools == "0":
        pytest.skip("no OpenBLAS with a pthreads pool of its own is loaded here")
    assert (done, count) == ("True", "5")


def test_the_pools_are_left_alone_while_other_python_threads_run():
    if not _blas.openblas_pools():
        pytest.skip("no OpenBLAS with a pthreads pool of its own is loaded here")
    started, release = threading.Event(), threading.Event()

    def other():
        started.set()
        release.wait(30)

    a = np.random.default_rng(4).standard_normal((300, 300))
    a @ a  # NumPy's BLAS workers exist again: a pool that quieting would stop
    assert any(flag is None or flag.value for flag in _blas._server_running.values())
    thread = threading.Thread(target=other)
    thread.start()
    try:
        started.wait(30)
        skipped = _blas._state["skipped_threads"]
        assert not _blas.quiet_other_pools()
        assert _blas._state["skipped_threads"] == skipped + 1
        q = np.random.default_rng(3).standard_normal((1, 2, 40, 8)).astype(np.float32)
        out = fastattn.scaled_dot_product_attention(q, q, q, backend="numba")
        assert_matches_reference(out, reference.scaled_dot_product_attention, q, q, q)
        assert "other Python threads were running" in " ".join(_blas.describe_pools().values())
    finally:
        release.set()
        thread.join()


# --- the layer's projections on Numba's threads ------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 37, 700])
def test_projection_on_numba_threads_is_numpys_product_bit_for_bit(dtype, rows):
    import numba

    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 48)).astype(dtype)
    w = rng.standard_normal((40, 48)).astype(dtype)
    b = rng.standard_normal(40).astype(dtype)
    x0, w0, b0 = x.copy(), w.copy(), b.copy()
    by_threads = {}
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            by_threads[threads] = mha._linear(x, w, b, on_numba=True)
    finally:
        numba.set_num_threads(before)
    results = list(by_threads.values())
    assert all(np.array_equal(r, results[0]) for r in results)  # any thread count, same bits
    assert np.array_equal(x, x0) and np.array_equal(w, w0) and np.array_equal(b, b0)
    expected = x @ w.T + b
    assert results[0].dtype == dtype and results[0].shape == (rows, 40)
    if _same_openblas_kernels():
        # NumPy's and SciPy's OpenBLAS run the same block products: the layer's result is
        # NumPy's product of the same row blocks, bit for bit. That is NumPy's whole product
        # too where the blocks do not change NumPy's own bits (neither splits a row's sums),
        # but an OpenBLAS may pick another kernel for a smaller product: on an AMD EPYC with
        # AVX-512, 700 rows whole and in blocks of 88 differ in the last bit.
        assert np.array_equal(results[0], _numpy_product_in_row_blocks(x, w, rows) + b)
    else:
        exact = x.astype(np.float64) @ w.T.astype(np.float64) + b
        tol = 1e-10 if dtype == np.float64 else 2 * np.abs(expected - exact).max() + 1e-6
        assert np.abs(results[0] - exact).max() <= tol
    no_bias = mha._linear(x, w, None, on_numba=True)
    assert np.allclose(no_bias, x @ w.T, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def _numpy_product_in_row_blocks(x, w, rows):
    """NumPy's x @ w.T in the layer's blocks of rows."""
    block = mha.linear_block_rows(rows)
    return np.concatenate([x[i:i + block] @ w.T for i in range(0, rows, block)])


def _same_openblas_kernels() -> bool:
    """Whether NumPy and SciPy both use an OpenBLAS built alike (same kernels)."""
    configs = [c for _, c, _ in _blas.openblas_pools()]
    if len(configs) != 2:
        return False
    words = [set(c.split()[2:]) - {"USE64BITINT"} for c in configs]
    return words[0] == words[1]


def test_projection_of_no_rows_is_empty():
    w = np.ones((5, 3), np.float32)
    out = mha._linear(np.ones((0, 3), np.float32), w, None, on_numba=True)
    assert out.shape == (0, 5)


@pytest.mark.parametrize("rows,expected", [(1, 64), (600, 75), (4096, 512), (100000, 512)])
def test_projection_blocks_depend_on_the_rows_only(rows, expected):
    assert mha.linear_block_rows(rows) == expected


@pytest.mark.parametrize("is_causal", [False, True])
def test_layer_on_numba_matches_the_numpy_layer(is_causal):
    layer = fastattn.MultiHeadAttention(32, 4, num_kv_heads=2, seed=0)
    x = np.random.default_rng(4).standard_normal((3, 20, 32)).astype(np.float32)
    got = layer(x, is_causal=is_causal, backend="numba")[0]
    ref = fastattn.MultiHeadAttention(32, 4, num_kv_heads=2, dtype=np.float64, seed=0)(
        x.astype(np.float64), is_causal=is_causal, backend="numpy")[0]
    plain = layer(x, is_causal=is_causal, backend="numpy")[0]
    assert np.abs(got - ref).max() <= 2 * np.abs(plain - ref).max() + 1e-6


# --- what info says ----------------------------------------------------------------------------

def test_info_lists_the_thread_pools_and_what_fastattn_did():
    out = _run("from fastattn import info; info.main([])").stdout
    assert "numba pool" in out
    assert "libgomp" in out or "threading layer" in out
    if _blas.openblas_pools():
        assert "its spin stopped before each fastattn kernel" in out
    user = _run("from fastattn import info; info.main([])", OMP_WAIT_POLICY="PASSIVE").stdout
    assert "set by the user: kept" in user
    off = _run("from fastattn import info; info.main([])", FASTATTN_QUIET_POOLS="0").stdout
    assert "FASTATTN_QUIET_POOLS=0" in off


def test_the_short_spin_is_set_only_while_numbas_runtime_loads():
    proc = _run("import os, numpy as np, fastattn\n"
                "q = np.ones((1, 1, 8, 4), np.float32)\n"
                "fastattn.scaled_dot_product_attention(q, q, q, backend='numba')\n"
                "from fastattn import _blas\n"
                "print('POOL', _blas.prepare_numba_pool())\n"
                "print('ENV', os.environ.get('GOMP_SPINCOUNT'))")
    assert _line(proc, "ENV") == "ENV None"
    assert "GOMP_SPINCOUNT=" in _line(proc, "POOL")


_ORDER = """
import os, sys
first, second = sys.argv[1:3]
__import__(first)
__import__(second)
import numpy as np, fastattn
from fastattn import _blas
q = np.ones((1, 1, 8, 4), np.float32)
fastattn.scaled_dot_product_attention(q, q, q, backend="numba")
print("POOL", _blas.prepare_numba_pool())
print("GOMP", " ".join(sorted(p for p in _blas._loaded_libraries()
                             if os.path.basename(p).startswith("libgomp"))))
print("ENV", os.environ.get("GOMP_SPINCOUNT"))
"""


def _run_order(first: str, second: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "FASTATTN_QUIET_POOLS",
                 "NUMBA_THREADING_LAYER"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _ORDER, first, second], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp's loading is Linux's")
def test_pytorch_imported_after_fastattn_shares_the_short_spin_runtime():
    # libgomp reads GOMP_SPINCOUNT when it loads: fastattn loads it at import, PyTorch's own
    # libraries then bind to that copy (same soname) instead of loading theirs.
    pytest.importorskip("torch")
    proc = _run_order("fastattn", "torch")
    assert "loaded at import with GOMP_SPINCOUNT=" in _line(proc, "POOL")
    runtimes = _line(proc, "GOMP").split()[1:]
    assert len(runtimes) == 1 and "torch" not in runtimes[0], runtimes
    assert _line(proc, "ENV") == "ENV None"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp's loading is Linux's")
def test_pytorch_imported_first_is_said_not_hidden():
    # Numba's threads then run on PyTorch's runtime, with its default spin: info says so rather
    # than claiming the short one.
    pytest.importorskip("torch")
    proc = _run_order("torch", "fastattn")
    pool = _line(proc, "POOL")
    assert "PyTorch's libgomp was loaded first" in pool and "GOMP_SPINCOUNT=" not in pool
    assert any("torch" in p for p in _line(proc, "GOMP").split()[1:])


# --- the bench's pipeline case -----------------------------------------------------------------

def test_back_to_back_timing_calls_each_sequence_in_order_without_pause():
    log = []
    sequences = {"pair": [lambda: log.append("a"), lambda: log.append("b")],
                 "one": [lambda: log.append("c")]}
    t = measure.time_back_to_back(sequences, calls=4, rounds=3, warmup=1)
    assert t["pair"]["runs"] == t["one"]["runs"] == 12
    assert log[:10] == ["a", "b"] * 5 and log[10:15] == ["c"] * 5
    assert log.count("a") == log.count("b") == log.count("c") == 15
    assert 0 <= t["one"]["min_s"] <= t["one"]["median_s"]


def test_pipeline_case_reports_ratios_against_the_goals(monkeypatch, tmp_path, capsys):
    import time

    def sleeper(seconds):
        return lambda: time.sleep(seconds)

    cases = [{"name": "fast pair", "kind": "pair",
              "steps": {"matmul": sleeper(0.001), "attention": sleeper(0.002)}},
             {"name": "layers", "kind": "layers",
              "steps": {"fastattn": sleeper(0.001), "torch": sleeper(0.003)}},
             {"name": "missing", "skipped": "PyTorch is not installed"}]
    monkeypatch.setattr(impls, "pipeline_cases", lambda dtype: cases)
    # The standalone cases (fresh processes, see the next test) as fixed times: on 5% slower.
    monkeypatch.setattr(measure, "standalone_quieting_on_off", lambda cases, threads, **kw: {
        c["key"]: {"on": 0.0105, "off": 0.0100, "ratio": 1.05, "ratios": [1.0, 1.1],
                   "rounds": 2} for c in cases})
    md = tmp_path / "r.md"
    assert cli.main(["--pipeline", "--quick", "--no-progress", "--markdown", str(md)]) == 0
    text = capsys.readouterr().out
    assert "pipeline: back to back, no settle time" in text and "median of 21 calls" in text
    assert "x the sum" in text and "x torch" in text and "skipped: PyTorch" in text
    assert "| fast pair |" in md.read_text()
    records = cli.run_pipeline(cli.parse_args(["--pipeline", "--quick"]),
                               cli.Progress(1, enabled=False))
    pair, layers, missing, *alone = records
    assert [r["kind"] for r in alone] == ["standalone"] * len(alone) and alone
    assert all(r["ratio"] == pytest.approx(1.05) and r["met"] for r in alone)
    assert "alone: numba" in text and "quieting on 10.50 ms, off 10.00 ms" in text
    assert "1.05x off (rounds 1.00-1.10)" in text
    assert 0.8 < pair["ratio"] < 1.5  # sleeps add up: the pair takes about the sum
    assert pair["sum_alone_ms"] == pytest.approx(pair["ms"]["first alone"]
                                                 + pair["ms"]["attention alone"])
    assert layers["ratio"] > 1.5 and layers["met"]
    assert missing["skipped"]


def test_standalone_timing_runs_with_the_quieting_on_and_off():
    # Real child processes: each must have read its FASTATTN_QUIET_POOLS (else "skipped").
    problem = impls.Problem(batch=1, heads=1, length=64, dim=16)
    cases = [{"key": "tiny", "impl": "numba",
              "problem": {k: getattr(problem, k) for k in impls.Problem.__dataclass_fields__}}]
    seen = []
    result = measure.standalone_quieting_on_off(cases, None, rounds=1, min_runs=2,
                                                on_round=lambda r, n, s: seen.append(s))
    assert sorted(seen) == ["off", "on"]
    assert "skipped" not in result["tiny"], result
    tiny = result["tiny"]
    assert tiny["on"] > 0 and tiny["off"] > 0 and tiny["rounds"] == 1
    assert tiny["ratio"] == pytest.approx(tiny["on"] / tiny["off"]) == tiny["ratios"][0]


def test_pipeline_cases_are_the_issues_cases():
    cases = impls.pipeline_cases("float32")
    names = [c["name"] for c in cases]
    assert names[0].startswith("NumPy matmul (1024x512 @ 512x512), then fastattn attention "
                               "B=1 H=8 L=1024 D=64 causal")
    pair = cases[0]["steps"]
    assert pair["matmul"]().shape == (1024, 512)
    if impls.available("torch") is None:
        layers = [c["name"] for c in cases if c.get("kind") == "layers"]
        assert layers == ["mha B=8 L=512 E=512 H=8", "mha B=8 L=512 E=512 H=8 causal",
                          "mha B=1 L=4096 E=512 H=8", "mha B=1 L=4096 E=512 H=8 causal"]
