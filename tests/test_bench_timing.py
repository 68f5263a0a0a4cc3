"""How the bench CLI times calls (fastattn.bench.measure.time_interleaved)."""
import time

import pytest

from fastattn.bench import impls as _bench_impls, measure as _bench_measure


def test_short_calls_get_an_untimed_call_before_each_timed_one(monkeypatch):
    monkeypatch.setattr(_bench_measure, "SETTLE_S", 0.0)
    monkeypatch.setattr(_bench_measure, "REWARM_BELOW_S", 0.01)
    counts = {"short": 0, "long": 0}

    def short():
        counts["short"] += 1

    def long():
        counts["long"] += 1
        time.sleep(0.02)

    def unavailable():
        raise _bench_impls.Unavailable("not here")

    result = _bench_measure.time_interleaved(
        {"short": short, "long": long, "missing": unavailable}, min_runs=4, min_time=0.0,
        max_runs=4)
    # one warm-up each; then 4 timed calls, each of the short one preceded by an untimed one
    assert counts == {"short": 1 + 2 * 4, "long": 1 + 4}
    assert result["short"]["runs"] == 4 and result["long"]["runs"] == 4
    assert result["long"]["median_s"] >= 0.02 > result["short"]["median_s"]
    assert result["missing"] == {"skipped": "not here"}


def test_the_memory_worker_measures_pytorch_too():
    # The worker is a fresh process with the package's parent directory on its path; with the
    # package directory itself there, fastattn's own torch.py shadowed PyTorch and every torch
    # case came back "skipped" (an ImportError).
    pytest.importorskip("torch")
    from dataclasses import asdict
    problem = _bench_impls.Problem(op="attention", batch=1, heads=1, length=64, kv_length=64,
                                   dim=8)
    cases = [{"key": impl, "impl": impl, "problem": asdict(problem)} for impl in ("numba", "torch")]
    reason = _bench_measure.memory_supported()
    if reason is not None:
        pytest.skip(reason)
    results = _bench_measure.measure_memory(cases, threads=1)
    for impl in ("numba", "torch"):
        assert "skipped" not in results[impl], results[impl]
        assert results[impl]["seconds"] > 0
