"""fastattn.distributed on a dask.distributed LocalCluster against the single-process call.

    python bench/dask_scaling.py                 # the RESULTS.md case (about 10 minutes on 2 idle cores)
    python bench/dask_scaling.py --quick         # L in {8192, 16384}, chunk 2048: a minute
    python bench/dask_scaling.py --lengths 65536 --workers 2 --scaling-workers ""   # one case

The case: B=1, H=1, D=64, float32, causal, L = S in --lengths (default 65536, 131072, 262144).

1. The single-process call ``fastattn.scaled_dot_product_attention`` on --threads Numba threads
   (default 2), in this process, before any cluster starts.
2. For each worker count (--workers, then --scaling-workers at the largest L): a LocalCluster of
   that many worker processes with --threads-per-worker threads (default 1). The inputs are made
   and persisted on the workers first (not timed); then the attention runs with its output
   gathered to this process chunk by chunk as each finishes (so the client ends with the whole
   result, as the single call does, and no worker holds all of it). Reported: the wall time and
   its ratio to the single call; where the workers' time went, from Dask's task stream: compute in
   pair tasks and in merges, transfer between workers, and the rest (scheduling, waiting and
   serialisation) as worker-seconds; and each worker's peak resident memory beyond its idle
   baseline (its RSS just before the run, inputs already held), sampled every 5 ms.

Prints Markdown for bench/RESULTS.md (and --json FILE keeps the figures). The machine should be
otherwise idle; unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE for this command.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import threading
import time

import numpy as np

try:
    import fastattn  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastattn  # noqa: E402
import fastattn.distributed  # noqa: E402

DIM = 64


def _ints(text):
    return [int(x) for x in text.replace(",", " ").split()]


def _flops(L):
    return 4 * L * L * DIM / 2  # causal: half the (query, key) pairs


# --- on the workers ---------------------------------------------------------------------------

def _start_sampler(dask_worker):
    """Sample this worker's RSS every 5 ms until told to stop; the baseline is now."""
    import psutil
    gc.collect()
    proc = psutil.Process()
    held = dask_worker.state  # the bytes of results and replicas Dask holds on this worker
    state = {"baseline": proc.memory_info().rss, "peak": 0, "stop": False,
             "held_baseline": held.nbytes, "held_peak": held.nbytes}
    state["peak"] = state["baseline"]

    def sample():
        while not state["stop"]:
            state["peak"] = max(state["peak"], proc.memory_info().rss)
            state["held_peak"] = max(state["held_peak"], held.nbytes)
            time.sleep(0.005)

    state["thread"] = threading.Thread(target=sample, daemon=True)
    state["thread"].start()
    dask_worker._fastattn_memory = state
    return state["baseline"]


def _stop_sampler(dask_worker):
    state = dask_worker._fastattn_memory
    state["stop"] = True
    state["thread"].join()
    return (state["baseline"], state["peak"], state["held_peak"] - state["held_baseline"])


def _warm_up():
    # Load the compiled kernel from Numba's cache on every worker before anything is timed.
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 600, DIM), dtype=np.float32)
    fastattn.scaled_dot_product_attention(q, q, q, is_causal=True, return_lse=True)
    return True


# --- here --------------------------------------------------------------------------------------

def single_call(L, threads, repeat):
    import numba
    numba.set_num_threads(threads)
    rng = np.random.default_rng(L)
    q, k, v = (rng.standard_normal((1, 1, L, DIM), dtype=np.float32) for _ in range(3))
    _warm_up()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def cluster_run(client, L, chunk, workers):
    import dask.array as da
    from distributed import as_completed, get_task_stream, wait

    rng = da.random.default_rng(L)
    shape, chunks = (1, 1, L, DIM), (1, 1, chunk, DIM)
    q, k, v = (rng.standard_normal(shape, chunks=chunks, dtype=np.float32) for _ in range(3))
    q, k, v = client.persist([q, k, v])
    wait([q, k, v])
    out = fastattn.distributed.scaled_dot_product_attention(q, k, v, is_causal=True)
    blocks = out.to_delayed().ravel().tolist()
    graph_keys = [key for key in out.__dask_graph__() if isinstance(key, tuple)]
    tasks = {kind: sum(str(key[0]).startswith(f"fastattn-{kind}-") for key in graph_keys)
             for kind in ("pair", "merge")}
    starts = np.cumsum((0,) + out.chunks[2][:-1])
    result = np.empty(shape, np.float32)

    client.run(_start_sampler)
    with get_task_stream(client) as stream:
        t0 = time.perf_counter()
        futures = client.compute(blocks)
        index = {f.key: i for i, f in enumerate(futures)}
        for future, block in as_completed(futures, with_results=True):
            i = index[future.key]
            result[:, :, starts[i]:starts[i] + block.shape[2]] = block
            future.release()
        wall = time.perf_counter() - t0
    memory = client.run(_stop_sampler)
    del q, k, v

    busy = {"pair": 0.0, "merge": 0.0, "other": 0.0, "transfer": 0.0}
    for record in stream.data:
        prefix = str(record["key"]).strip("('").split("-")[1] if "fastattn-" in \
            str(record["key"]) else "other"
        for part in record["startstops"]:
            seconds = part["stop"] - part["start"]
            if part["action"] == "transfer":
                busy["transfer"] += seconds
            elif part["action"] == "compute":
                kind = prefix if prefix in ("pair", "merge") else "other"
                busy[kind] += seconds
    rest = workers * wall - sum(busy.values())
    extra = {addr: (peak - base) / 2**20 for addr, (base, peak, _) in memory.items()}
    baseline = {addr: base / 2**20 for addr, (base, _, _) in memory.items()}
    held = {addr: h / 2**20 for addr, (_, _, h) in memory.items()}
    return dict(L=L, chunk=chunk, workers=workers, wall_s=wall, busy_s=busy,
                rest_worker_s=rest, tasks=tasks, extra_mib=sorted(extra.values()),
                baseline_mib=sorted(baseline.values()),
                held_mib=[held[a] for a in sorted(extra, key=extra.get)],
                chunk_mib=chunk * DIM * 4 / 2**20,
                checksum=float(np.abs(result).sum()))


def start_cluster(workers, threads_per_worker, amm_interval, drop_spare):
    import dask
    from distributed import Client, LocalCluster
    # Dask drops a worker's replica of an input chunk (fetched for a pair) once no task waiting
    # there needs it, when its active memory manager runs: every 2 s by default.
    config = {"distributed.scheduler.active-memory-manager.interval": amm_interval}
    if drop_spare:
        config["distributed.scheduler.active-memory-manager.policies"] = [
            {"class": "distributed.active_memory_manager.ReduceReplicas"},
            {"class": "fastattn.distributed.DropSpareReplicas"}]
    dask.config.set(config)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                           processes=True, dashboard_address=None, memory_limit=0,
                           silence_logs=logging.ERROR)
    client = Client(cluster)
    client.wait_for_workers(workers)
    client.run(_warm_up)
    return cluster, client


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=_ints, default=[65536, 131072, 262144])
    parser.add_argument("--chunk", type=int, default=16384, help="positions per chunk")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="the single call's threads")
    parser.add_argument("--scaling-workers", type=_ints, default=[1, 2, 4],
                        help="worker counts at the largest length ('' for none)")
    parser.add_argument("--repeat", type=int, default=1, help="single calls per length")
    parser.add_argument("--amm-interval", default="100ms",
                        help="how often Dask drops unneeded replicas (its default: 2s)")
    parser.add_argument("--keep-replicas", action="store_true",
                        help="Dask's default policy only, without fastattn.distributed."
                             "DropSpareReplicas")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.chunk, args.scaling_workers = [8192, 16384], 2048, [1, 2]

    single = {L: single_call(L, args.threads, args.repeat) for L in args.lengths}
    for L, t in single.items():
        print(f"single call L={L}: {t:.2f} s ({_flops(L) / t / 1e9:.1f} GFLOP/s, "
              f"{args.threads} threads)", flush=True)

    runs = []
    counts = [args.workers] + [w for w in args.scaling_workers if w != args.workers]
    for workers in counts:
        cluster, client = start_cluster(workers, args.threads_per_worker, args.amm_interval,
                                        not args.keep_replicas)
        try:
            lengths = args.lengths if workers == args.workers else args.lengths[-1:]
            for L in lengths:
                run = cluster_run(client, L, args.chunk, workers)
                run["single_s"] = single[L]
                runs.append(run)
                print(f"{workers} workers L={L}: {run['wall_s']:.2f} s "
                      f"({run['wall_s'] / single[L]:.2f}x the single call), extra memory "
                      f"{', '.join(f'{m:.0f}' for m in run['extra_mib'])} MiB", flush=True)
        finally:
            client.close()
            cluster.close()

    print()
    print(f"B=1, H=1, D={DIM}, float32, causal; chunks of {args.chunk} positions "
          f"({args.chunk * DIM * 4 / 2**20:.0f} MiB per q/k/v/out chunk); workers x "
          f"{args.threads_per_worker} thread; the single call on {args.threads} threads.")
    print()
    print("| L = S | workers | time (s) | x single call | single call (s) | pair compute "
          "(worker-s) | merge (worker-s) | transfer (worker-s) | scheduling, waiting, other "
          "(worker-s) | tasks (pairs, merges) | worker peak beyond idle (MiB) | of which Dask "
          "held results and replicas, at most (MiB) | worker idle RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        b = r["busy_s"]
        print(f"| {r['L']} | {r['workers']} | {r['wall_s']:.2f} | {r['wall_s'] / r['single_s']:.2f} "
              f"| {r['single_s']:.2f} | {b['pair']:.1f} | {b['merge']:.2f} | {b['transfer']:.2f} "
              f"| {r['rest_worker_s'] + b['other']:.2f} | {r['tasks']['pair']}, "
              f"{r['tasks']['merge']} | {', '.join(f'{m:.0f}' for m in r['extra_mib'])} | "
              f"{', '.join(f'{m:.0f}' for m in r['held_mib'])} | "
              f"{', '.join(f'{m:.0f}' for m in r['baseline_mib'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"single_s": {str(k): v for k, v in single.items()}, "runs": runs,
                       "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
