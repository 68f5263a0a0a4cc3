"""Every operation, size, dtype and implementation, timed by pytest-benchmark.

Operations: softmax, similarity, attention (plain, causal, with a float mask, grouped-query) and
the multi-head layer when ``fastattn.MultiHeadAttention`` exists. Implementations: fastattn
``numba``, fastattn ``numpy`` (the reference), the plain NumPy ``formula``, ``scipy.special
.softmax`` (softmax only), ``torch`` when installed and fastattn ``cuda`` when a GPU is usable;
the last two are skipped with the reason otherwise. The first call of each (JIT compilation,
thread pools, copies to the GPU) happens before the timed part, and its answer is checked
against the plain formula, so that a benchmark never times a wrong answer.
"""
import numpy as np
import pytest

from fastattn.bench import impls
from fastattn.bench.impls import Problem

# (name, problem without length/dtype, quick length, full length)
VARIANTS = [
    ("softmax", Problem(op="softmax"), 512, 2048),
    ("similarity", Problem(op="similarity"), 512, 2048),
    ("attention", Problem(), 512, 2048),
    ("attention-causal", Problem(causal=True), 512, 2048),
    ("attention-float-mask", Problem(mask="float"), 512, 2048),
    ("attention-gqa", Problem(kv_heads=2, causal=True), 512, 2048),
    # issue 5's size for the layer: B=8, L=512, E=512, 8 heads
    ("mha", Problem(op="mha", batch=8), 128, 512),
]


def _params():
    params = []
    for name, base, quick_length, full_length in VARIANTS:
        for length in (quick_length, full_length):
            for dtype in ("float32", "float64"):
                problem = base.with_(length=length, dtype=dtype)
                quick = length == quick_length and dtype == "float32"
                for impl in impls.IMPLS[problem.op]:
                    params.append(pytest.param(
                        problem, impl, id=f"{name}-L{length}-{dtype}-{impl}",
                        marks=[pytest.mark.quick] if quick else []))
    return params


def _to_numpy(result):
    if isinstance(result, tuple):  # the layers return (out, weights)
        result = result[0]
    if hasattr(result, "copy_to_host"):
        return result.copy_to_host()
    if hasattr(result, "numpy"):
        return result.numpy()
    return np.asarray(result)


@pytest.mark.parametrize("problem, impl", _params())
def test_bench(benchmark, problem_inputs, problem, impl):
    reason = impls.available(impl)
    if reason is not None:
        pytest.skip(reason)
    arrays, expected = problem_inputs(problem)
    try:
        fn = impls.prepare(impl, problem, arrays)
        first = fn()  # compile, start thread pools: outside the timed part
    except impls.Unavailable as exc:
        pytest.skip(str(exc))
    if expected is not None:
        tol = 1e-9 if problem.dtype == "float64" else 2e-4
        np.testing.assert_allclose(_to_numpy(first), expected, rtol=tol * 10, atol=tol)
    del first

    benchmark.group = problem.label()
    benchmark.extra_info.update(problem.as_dict())
    benchmark(fn)
    flops = problem.flops()
    if flops and benchmark.stats is not None:
        benchmark.extra_info["gflops_at_median"] = flops / benchmark.stats.stats.median / 1e9
