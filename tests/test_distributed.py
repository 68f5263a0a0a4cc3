"""fastattn.distributed: attention sharded along the sequence on Dask, against the single call."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import fastattn  # noqa: E402
from fastattn import distributed as fd  # noqa: E402
from fastattn import reference  # noqa: E402
from fastattn._prepare import NO_LIMIT  # noqa: E402

from conftest import assert_matches_reference  # noqa: E402



def _inputs(rng, lead, L, S, E=8, Ev=8, kv_lead=None, dtype=np.float32):
    kv_lead = lead if kv_lead is None else kv_lead
    q = rng.standard_normal((*lead, L, E)).astype(dtype)
    k = rng.standard_normal((*kv_lead, S, E)).astype(dtype)
    v = rng.standard_normal((*kv_lead, S, Ev)).astype(dtype)
    return q, k, v


def _chunked(x, seq_chunks):
    return da.from_array(x, chunks=(*x.shape[:-2], seq_chunks, x.shape[-1]))


def _check(q, k, v, q_chunks, k_chunks, scheduler="sync", mask=None, **kw):
    """The sharded result and lse against the reference (accuracy rule) and the single call."""
    backend = kw.pop("backend", "auto")
    out, lse = fd.scaled_dot_product_attention(_chunked(q, q_chunks), _chunked(k, k_chunks),
                                               _chunked(v, k_chunks), mask, return_lse=True,
                                               backend=backend, **kw)
    assert out.chunks[-2] == _chunked(q, q_chunks).chunks[-2]  # chunks follow the query's
    assert lse.chunks[-1] == out.chunks[-2]
    got_out, got_lse = dask.compute(out, lse, scheduler=scheduler)
    assert got_out.dtype == q.dtype and got_out.shape == (*q.shape[:-1], v.shape[-1])
    if hasattr(mask, "compute"):
        mask = mask.compute()
    ref_kw = {key: kw[key] for key in ("is_causal", "scale", "enable_gqa") if key in kw}
    variants = {key: kw[key] for key in ("alignment", "window", "softcap", "alibi_slopes")
                if key in kw}
    assert_matches_reference((got_out, got_lse), reference.scaled_dot_product_attention,
                             q, k, v, mask, return_lse=True, **ref_kw, **variants)
    single_out, single_lse = fastattn.scaled_dot_product_attention(
        q, k, v, mask, return_lse=True, backend=backend, **ref_kw, **variants)
    tol = 1e-10 if q.dtype == np.float64 else 2e-5
    np.testing.assert_allclose(got_out, single_out, rtol=0, atol=tol)
    np.testing.assert_allclose(got_lse, single_lse, rtol=0, atol=tol * 8)
    np.testing.assert_array_equal(np.isneginf(got_lse), np.isneginf(single_lse))
    return got_out, got_lse


# --- the geometry, by brute force against keys_seen ------------------------------------------


@pytest.mark.parametrize("n,m,d", [(5, 5, 0), (4, 7, 2), (7, 4, -3), (6, 6, 9), (6, 6, -9),
                                   (3, 8, -1), (8, 3, 4), (1, 1, 0)])
@pytest.mark.parametrize("left,right", [(NO_LIMIT, 0), (2, 0), (NO_LIMIT, NO_LIMIT), (1, 3),
                                        (0, 0), (NO_LIMIT, 2)])
def test_rectangles_cover_the_pair_and_keep_the_pattern(n, m, d, left, right):
    x = np.arange(n)[:, None] + d - np.arange(m)[None, :]
    seen = (x >= -right) & (x <= left)
    covered = np.zeros((n, m), int)
    for r in fd._rectangles(n, m, d):
        part = x[r[0]:r[1], r[2]:r[3]]
        assert part.size and (np.all(part >= 0) or np.all(part <= 0) or r[2] - r[0] == d)
        t = fd._trim(*r, d, left, right)
        if t is None:
            assert not seen[r[0]:r[1], r[2]:r[3]].any()
            continue
        ra, rb, ca, cb = t
        covered[ra:rb, ca:cb] += 1
        # nothing seen is trimmed away
        assert seen[r[0]:r[1], r[2]:r[3]].sum() == seen[ra:rb, ca:cb].sum()
        causal, window = fd._local_window(rb - ra, cb - ca, ra + d - ca, left, right)
        local = reference.keys_seen(rb - ra, cb - ca, causal, "top_left", window)
        np.testing.assert_array_equal(local, seen[ra:rb, ca:cb])
    assert covered.max() <= 1 and np.all(covered[seen] == 1)
    assert fd._pair_is_empty(n, m, d, left, right) == (not seen.any())


# --- equal to the single call on the synchronous scheduler ------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_single_call_plain_and_causal(rng, causal, dtype):
    q, k, v = _inputs(rng, (2, 3), 96, 96, dtype=dtype)
    _check(q, k, v, 32, 32, is_causal=causal)


@pytest.mark.parametrize("q_chunks,k_chunks", [((40, 7, 49), (30, 30, 36)), ((96,), (13, 83)),
                                               ((1, 95), (50, 46))])
def test_uneven_chunks_causal(rng, q_chunks, k_chunks):
    q, k, v = _inputs(rng, (1, 2), 96, 96)
    _check(q, k, v, q_chunks, k_chunks, is_causal=True)


def test_uneven_chunks_cross_attention(rng):
    q, k, v = _inputs(rng, (2,), 50, 130, Ev=5)
    _check(q, k, v, (20, 30), (60, 31, 39), scale=0.3)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("L,S", [(40, 100), (100, 40)])
def test_causal_alignments_and_rows_without_keys(rng, alignment, L, S):
    q, k, v = _inputs(rng, (2,), L, S)
    out, lse = _check(q, k, v, (13, L - 13), (30, S - 30), is_causal=True, alignment=alignment)
    if alignment == "bottom_right" and L > S:  # rows with p(i) < 0 see no key
        assert np.all(out[:, :L - S] == 0) and np.all(np.isneginf(lse[:, :L - S]))


@pytest.mark.parametrize("window,causal", [((5, 0), True), ((7, 3), False), ((None, 4), False),
                                           ((0, 0), False), ((20, None), False)])
def test_windows(rng, window, causal):
    q, k, v = _inputs(rng, (1, 2), 90, 90)
    _check(q, k, v, (25, 25, 40), (16, 50, 24), is_causal=causal, window=window)


def test_window_pairs_outside_are_never_scheduled(rng):
    q, k, v = _inputs(rng, (1,), 128, 128)
    for kw, expected in ((dict(is_causal=True), 8 * 9 // 2), (dict(window=(16, 0)), 8 + 7),
                         ({}, 64)):
        out = fd.scaled_dot_product_attention(_chunked(q, 16), _chunked(k, 16), _chunked(v, 16),
                                              backend="numpy", **kw)
        pairs = [key for key in out.__dask_graph__() if isinstance(key, tuple)
                 and key[0].startswith("fastattn-pair-")]
        assert len(pairs) == expected, kw


def test_merge_tree_holds_a_few_parts(rng):
    q, k, v = _inputs(rng, (1,), 32, 200)
    out = fd.scaled_dot_product_attention(_chunked(q, 32), _chunked(k, 10), _chunked(v, 10))
    graph = dict(out.__dask_graph__())
    merges = [task for key, task in graph.items() if isinstance(key, tuple)
              and key[0].startswith("fastattn-merge-")]
    assert merges and max(len(task[1]) for task in merges) <= fd.MERGE_FAN_IN
    assert_matches_reference(out.compute(scheduler="sync"), reference.scaled_dot_product_attention,
                             q, k, v)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa(rng, kv_heads):
    q, k, v = _inputs(rng, (2, 4), 64, 64, kv_lead=(2, kv_heads))
    _check(q, k, v, (20, 44), (33, 31), is_causal=True, enable_gqa=True)


def test_gqa_with_window_softcap_alibi(rng):
    q, k, v = _inputs(rng, (2, 4), 70, 70, kv_lead=(2, 2))
    slopes = np.array([0.5, 0.25, 0.125, 0.0625])
    _check(q, k, v, (20, 50), (33, 37), is_causal=True, enable_gqa=True, window=(30, 0),
           softcap=2.0, alibi_slopes=slopes)


@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(window=(9, 4)),
                                dict(is_causal=True, alignment="bottom_right")])
def test_alibi_uses_global_distances(rng, kw):
    # Large slopes make any error in |p(i) - j| visible; uneven chunks put every pair off the
    # diagonal differently.
    q, k, v = _inputs(rng, (2, 2), 50, 70)
    slopes = np.array([[1.5, 0.3], [0.05, 2.0]])
    _check(q, k, v, (17, 33), (25, 9, 36), alibi_slopes=slopes, **kw)


@pytest.mark.parametrize("kind", ["bool", "float", "bool_broadcast_rows"])
def test_masks(rng, kind):
    q, k, v = _inputs(rng, (2, 2), 40, 60)
    if kind == "bool":
        mask = rng.random((2, 2, 40, 60)) < 0.7
    elif kind == "float":
        mask = rng.standard_normal((2, 40, 60)).astype(np.float32)  # broadcast over heads
    else:
        mask = rng.random((60,)) < 0.8  # one key mask for every row (padding)
    _check(q, k, v, (15, 25), (20, 40), mask=mask, is_causal=True)
    _check(q, k, v, (15, 25), (20, 40), mask=da.from_array(mask), is_causal=True)
    _check(q, k, v, (15, 25), (20, 40), mask=mask, window=(10, 3),
           alibi_slopes=np.array([0.2, 0.7]))


def test_numpy_inputs_are_wrapped_by_the_memory_budget_and_not_written(rng):
    q, k, v = _inputs(rng, (1, 2), 300, 300)
    copies = [a.copy() for a in (q, k, v)]
    expected_length = fd.chunk_length(300, 300, 2, 2, 8, 8, 4, 16 * 1024)
    with dask.config.set({"array.chunk-size": "16KiB"}):
        out = fd.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert expected_length < 300 and out.chunks[-2][0] == expected_length
    assert_matches_reference(out.compute(scheduler="sync"), reference.scaled_dot_product_attention,
                             q, k, v, is_causal=True)
    for a, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(a, c)


def test_chunk_length_grows_with_the_budget():
    small = fd.chunk_length(10**6, 10**6, 8, 8, 64, 64, 4, 64 << 20)
    large = fd.chunk_length(10**6, 10**6, 8, 8, 64, 64, 4, 512 << 20)
    assert small % 512 == 0 and large % 512 == 0 and 7 * small <= large <= 9 * small
    # a pair task's arrays, and a merge's parts, fit the budget
    for length, budget in ((small, 64 << 20), (large, 512 << 20)):
        assert length * 4 * (8 * 129 + 2 * 8 * 128) <= budget
        assert length * 4 * (fd.MERGE_FAN_IN + 5) * 8 * 65 <= budget
    assert fd.chunk_length(100, 300, 1, 1, 8, 8, 4, 1 << 30) == 300  # one chunk when it fits


@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_other_schedulers(rng, scheduler):
    q, k, v = _inputs(rng, (1, 2), 60, 60)
    with dask.config.set(num_workers=2):
        _check(q, k, v, (30, 30), (20, 40), scheduler=scheduler, is_causal=True,
               backend="numpy" if scheduler == "processes" else "auto")


def test_errors(rng):
    q, k, v = _inputs(rng, (1, 2), 16, 16)
    with pytest.raises(ValueError, match="backend"):
        fd.scaled_dot_product_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="key and value must have the same sequence length"):
        fd.scaled_dot_product_attention(_chunked(q, 8), _chunked(k, 8), _chunked(v[..., :9, :], 3))
    with pytest.raises(ValueError, match="window"):
        fd.scaled_dot_product_attention(q, k, v, window=(-1, 0))
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        lazy = _chunked(q, 8)
        fd.scaled_dot_product_attention(lazy[lazy[:, :, :, 0].sum(axis=(0, 1)) > -1e9], k, v)


def test_import_fastattn_does_not_import_dask():
    code = ("import sys, fastattn, fastattn.distributed; "
            "print(any(m == 'dask' or m.startswith('dask.') for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


# --- a LocalCluster of two worker processes ---------------------------------------------------


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    policies = [{"class": "distributed.active_memory_manager.ReduceReplicas"},
                {"class": "fastattn.distributed.DropSpareReplicas"}]
    with dask.config.set({"distributed.scheduler.active-memory-manager.policies": policies,
                          "distributed.scheduler.active-memory-manager.interval": "50ms"}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=logging.ERROR,
                                           death_timeout=120)
    amm = cluster.scheduler.extensions["amm"]
    assert {type(p).__name__ for p in amm.policies} == {"ReduceReplicas", "DropSpareReplicas"}
    c = distributed.Client(cluster, timeout=120)
    # The workers unpickle this module's functions by value (tests/ is not a package).
    import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    c.wait_for_workers(2, timeout=120)
    yield c
    c.close()
    cluster.close(timeout=60)


def _run(client, *arrays, timeout=240):
    """Compute on the cluster, bounded in time."""
    got = tuple(f.result(timeout=timeout) for f in client.compute(list(arrays)))
    return got if len(got) > 1 else got[0]


def test_local_cluster_causal_uneven_gqa(client, rng):
    q, k, v = _inputs(rng, (1, 4), 120, 120, kv_lead=(1, 2))
    out, lse = fd.scaled_dot_product_attention(_chunked(q, (50, 30, 40)),
                                               _chunked(k, (64, 56)), _chunked(v, (64, 56)),
                                               is_causal=True, enable_gqa=True, return_lse=True)
    got = _run(client, out, lse)
    assert_matches_reference(got, reference.scaled_dot_product_attention, q, k, v,
                             is_causal=True, enable_gqa=True, return_lse=True)


def test_local_cluster_window_and_not_causal(client, rng):
    q, k, v = _inputs(rng, (2,), 80, 100)
    for kw in (dict(window=(12, 5)), dict()):
        out = fd.scaled_dot_product_attention(_chunked(q, (30, 50)), _chunked(k, 40),
                                              _chunked(v, 40), **kw)
        kw.pop("backend", None)
        assert_matches_reference(_run(client, out),
                                 reference.scaled_dot_product_attention, q, k, v, **kw)


def _numba_threads_in_task():
    import numba
    fd._set_numba_threads()
    return numba.get_num_threads()


def test_local_cluster_numba_threads_follow_the_worker(client):
    threads = client.run(lambda dask_worker: dask_worker.state.nthreads)
    assert set(threads.values()) == {1}
    futures = [client.submit(_numba_threads_in_task, pure=False, workers=[w])
               for w in threads]
    assert [f.result(timeout=120) for f in futures] == [1, 1]


def _kill_once_plugin(marker):
    """A worker plugin that kills its worker process as it starts a pair task, once over the
    cluster (a file marks that it happened)."""
    from distributed import WorkerPlugin

    class KillOnce(WorkerPlugin):
        name = "fastattn-kill-once"

        def transition(self, key, start, finish, **kwargs):
            if finish == "executing" and isinstance(key, tuple) and \
                    str(key[0]).startswith("fastattn-pair-"):
                try:
                    fd_ = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return
                os.close(fd_)
                os._exit(1)

    return KillOnce()


def test_local_cluster_killed_worker_is_retried(client, rng, tmp_path):
    marker = str(tmp_path / "killed")
    plugin = _kill_once_plugin(marker)
    client.register_plugin(plugin, name=plugin.name)
    try:
        q, k, v = _inputs(rng, (1, 2), 96, 96)
        out, lse = fd.scaled_dot_product_attention(_chunked(q, 32), _chunked(k, 32),
                                                   _chunked(v, 32), is_causal=True,
                                                   return_lse=True)
        got = _run(client, out, lse)
        assert os.path.exists(marker)  # a worker did die in a pair task
        assert_matches_reference(got, reference.scaled_dot_product_attention, q, k, v,
                                 is_causal=True, return_lse=True)
    finally:
        client.unregister_worker_plugin(plugin.name)
    client.wait_for_workers(2, timeout=120)  # the nanny restarted it
