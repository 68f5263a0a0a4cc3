"""``python -m fastattn bench``: fastattn against NumPy and PyTorch, timed in one run.

Prints a header (CPU, threads, threading layer, BLAS, versions), this machine's matrix-product
peak measured in the same run, then for each case and implementation the median time, GFLOP/s,
the share of that peak, the extra memory of one call and the speed ratios against NumPy and
PyTorch; then how time and memory grow with the sequence length L (fitted exponents).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field

from . import _bench_impls as impls
from . import _bench_measure as measure
from ._bench_impls import Problem

DEFAULT_LENGTHS = (1024, 4096, 8192)
QUICK_LENGTHS = (1024, 2048)
MEMORY_CHECK = Problem(op="attention", batch=1, heads=1, length=32768, dim=64)
MEMORY_LIMIT_MIB = 64
RATIO_BASELINES = ("numpy", "formula", "torch")

EPILOG = f"""\
implementations:
  numba    fastattn's fused CPU kernels (backend="numba")
  numpy    fastattn's NumPy reference (backend="numpy")
  formula  the plain NumPy formula softmax(q @ k.T * scale) @ v, written in place
  torch    torch.nn.functional.scaled_dot_product_attention (PyTorch's CPU flash kernel)
  cuda     fastattn on the GPU, inputs already there (only when a CUDA GPU is usable)
  Ratios "x numpy", "x formula", "x torch" are that implementation's time over this one's:
  above 1 means this one is faster.

measures:
  GFLOP/s counts 4*B*H*L*S*D per attention call (half that when causal); the peak is NumPy's
  matrix product (sgemm for float32) on the same threads in the same run. Extra memory is the
  growth of the peak resident set during one call, less its output, measured in a fresh
  process (Linux only); it should grow like L for fused kernels and like L^2 for the formula.

before you run it:
  Unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE for this command only (they slow NumPy's BLAS
  when set), e.g.  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m fastattn bench
  Stop other work on the machine if you can. Figures are only comparable within one run: the
  implementations take turns call by call, so a change in load hits them all alike, but
  another run on another day (or another machine) sees other load, clocks and BLAS.

examples:
  python -m fastattn bench --quick                    # about 30 s: the README's figures
  python -m fastattn bench                            # issue 3's sizes: L=1024,4096,8192
  python -m fastattn bench --memory-check             # one call at L=S=32768, H=1: < {MEMORY_LIMIT_MIB} MiB?
  python -m fastattn bench --full --json bench/results.json --plot bench/results.png \\
      --markdown bench/results.md                     # everything bench/RESULTS.md shows
"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1024,4096, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(choices):
    def parse(text: str) -> list[str]:
        names = [x for x in text.replace(",", " ").split() if x]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"choose from {', '.join(choices)}; got {text!r}")
        return names
    return parse


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastattn bench", description=__doc__.split("\n\n")[0].strip("`: "),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to run")
    what.add_argument("--quick", action="store_true",
                      help=f"a short run: L={','.join(map(str, QUICK_LENGTHS))}, fewer calls")
    what.add_argument("--full", action="store_true",
                      help="everything bench/RESULTS.md shows: the default cases, plus a float "
                           "mask, GQA, the multi-head layer and --memory-check")
    what.add_argument("--memory-check", action="store_true",
                      help=f"only the memory check: one call at B=1, H=1, L=S=32768, D=64 "
                           f"float32 must need < {MEMORY_LIMIT_MIB} MiB beyond inputs and output "
                           f"(exit status 1 if not)")
    what.add_argument("--lengths", type=_int_list, metavar="L,...",
                      help=f"sequence lengths L=S (default {','.join(map(str, DEFAULT_LENGTHS))})")
    causal = what.add_mutually_exclusive_group()
    causal.add_argument("--causal", action="store_true", help="causal attention only")
    causal.add_argument("--no-causal", action="store_true", help="non-causal attention only")
    what.add_argument("--dtype", choices=impls.DTYPES, default="float32",
                      help="(default float32; float16 is computed in float32)")
    what.add_argument("--batch", type=int, default=1, metavar="B", help="(default 1)")
    what.add_argument("--heads", type=int, default=8, metavar="H", help="query heads (default 8)")
    what.add_argument("--kv-heads", type=int, metavar="HKV",
                      help="key/value heads: fewer than --heads is grouped-query attention")
    what.add_argument("--dim", type=int, default=64, metavar="D", help="head size (default 64)")
    what.add_argument("--mask", choices=("none", "float", "bool"), default="none",
                      help="an (L, S) mask broadcast over batch and heads (default none)")
    what.add_argument("--impls", type=_name_list(impls.IMPLS["attention"]), metavar="NAME,...",
                      default=list(impls.IMPLS["attention"]),
                      help="implementations to compare (default: all usable here)")
    how = parser.add_argument_group("how")
    how.add_argument("--threads", type=int, metavar="N",
                     help="threads for Numba, NumPy's BLAS and PyTorch (default: all cores)")
    how.add_argument("--min-runs", type=int, metavar="N",
                     help="timed calls per implementation at least (default 5; 3 with --quick)")
    how.add_argument("--min-time", type=float, metavar="S",
                     help="seconds of timed calls per implementation at least, if --min-runs "
                          "are quicker (default 2; 0.3 with --quick)")
    how.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    out.add_argument("--plot", metavar="FILE.png",
                     help="GFLOP/s and memory against L, log-log (needs matplotlib)")
    out.add_argument("--markdown", metavar="FILE",
                     help="write the report as Markdown (a section for bench/RESULTS.md)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib, which is not installed: "
                     "pip install 'fastattn[bench]' (or pip install matplotlib)")
    kv_heads = args.heads if args.kv_heads is None else args.kv_heads
    if args.heads < 1 or kv_heads < 1 or args.heads % kv_heads:
        parser.error(f"--heads ({args.heads}) must be a positive multiple of --kv-heads "
                     f"({kv_heads})")
    if args.lengths is None:
        args.lengths = list(QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    if args.min_runs is None:
        args.min_runs = 3 if args.quick else 5
    if args.min_time is None:
        args.min_time = 0.3 if args.quick else 2.0
    return args


# --- the cases ---------------------------------------------------------------------------------

@dataclass
class Group:
    """Cases shown together; ``sweep``: the cases differ in L, so fit exponents over them."""
    name: str
    problems: list
    sweep: bool = False
    impls: tuple = ()
    note: str = ""


def build_groups(args) -> list[Group]:
    causal_modes = [True] if args.causal else [False] if args.no_causal else [False, True]
    mask = None if args.mask == "none" else args.mask
    base = Problem(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim,
                   dtype=args.dtype, mask=mask)
    chosen = tuple(args.impls)
    if args.memory_check:
        return []
    groups = [Group("attention", [base.with_(length=L, causal=c)
                                  for c in causal_modes for L in sorted(args.lengths)],
                    sweep=len(args.lengths) > 1, impls=chosen)]
    if args.full:
        short = [L for L in sorted(args.lengths) if L <= 4096] or sorted(args.lengths)[:1]
        groups.append(Group("float mask", [base.with_(length=L, mask="float") for L in short],
                            sweep=len(short) > 1, impls=chosen))
        gqa = base.with_(kv_heads=max(1, base.heads // 4), causal=True)
        groups.append(Group("grouped-query attention",
                            [gqa.with_(length=L) for L in short], sweep=len(short) > 1,
                            impls=chosen))
        mha = Problem(op="mha", batch=8, heads=8, length=512, dim=64, dtype=args.dtype)
        import fastattn
        note = "" if hasattr(fastattn, "MultiHeadAttention") else \
            "fastattn.MultiHeadAttention is not in this version: only PyTorch's layer is timed"
        groups.append(Group("multi-head layer", [mha],
                            impls=tuple(i for i in chosen if i in impls.IMPLS["mha"]),
                            note=note))
    return groups


# --- progress ----------------------------------------------------------------------------------

class Progress:
    """A plain-text progress bar on stderr (one line per step when stderr is not a terminal)."""

    def __init__(self, total: float, enabled: bool = True, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.start = time.perf_counter()
        self.step_label = ""

    def step(self, label: str):
        """A new step (one unit of work) begins."""
        self.step_label = label
        if self.enabled and not self.tty:
            print(f"[{self._elapsed()}] {label}", file=self.stream, flush=True)
        self.show(0.0, "")

    def show(self, fraction: float, detail: str):
        """Within the current step, ``fraction`` of it is done; ``detail`` says what runs."""
        if not self.tty:
            return
        width = shutil.get_terminal_size((100, 20)).columns - 1
        share = min(1.0, (self.done + min(max(fraction, 0.0), 1.0)) / self.total)
        bar = "#" * int(round(share * 24))
        text = f"[{bar:<24}] {share * 100:3.0f}% {self._elapsed()}  {self.step_label}"
        if detail:
            text += f": {detail}"
        self.stream.write("\r" + text[:width].ljust(width))
        self.stream.flush()

    def advance(self):
        self.done += 1

    def close(self):
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r" + " " * width + "\r")
            self.stream.flush()
        elif self.enabled:
            print(f"[{self._elapsed()}] done", file=self.stream, flush=True)

    def _elapsed(self) -> str:
        seconds = int(time.perf_counter() - self.start)
        return f"{seconds // 60}:{seconds % 60:02d}"


# --- running -----------------------------------------------------------------------------------

def _usable(names) -> tuple[list, dict]:
    usable, skipped = [], {}
    for name in names:
        reason = impls.available(name)
        if reason is None:
            usable.append(name)
        else:
            skipped[name] = reason
    return usable, skipped


def _first_call(args) -> dict:
    """Time fastattn's first call in this process: loading the cached kernels, or compiling."""
    problem = Problem(heads=1, length=256, dtype=args.dtype)
    if impls.available("numba") is not None:
        return {}
    fn = impls.prepare("numba", problem, impls.make_inputs(problem))
    start = time.perf_counter()
    fn()
    return {"fastattn first call": f"{time.perf_counter() - start:.2f} s (Numba loads the "
                                   f"cached kernels, or compiles them on a first run)"}


def run(args) -> dict:
    """Run the benchmark the options describe; every figure in one dict (what --json writes)."""
    groups = build_groups(args)
    wanted = sorted({i for g in groups for i in g.impls} | ({"numba"} if args.memory_check or
                                                             args.full else set()))
    if "torch" in wanted and impls.available("torch") is None:
        import torch  # noqa: F401  (imported before the threads are set, so they apply to it)
    memory_reason = None if not args.no_memory else "--no-memory"
    memory_reason = memory_reason or measure.memory_supported()
    check = args.memory_check or args.full
    n_cases = sum(len(g.problems) for g in groups)
    total = 2 + n_cases + (1 if memory_reason is None and n_cases else 0) + (1 if check else 0)
    progress = Progress(total, enabled=not args.no_progress)
    results = {"command": "python -m fastattn bench " + " ".join(args.argv),
               "options": {k: v for k, v in vars(args).items() if k != "argv"}}
    try:
        with measure.threads_limited(args.threads):
            progress.step("the machine")
            header = measure.system_header(args.threads)
            header.update(_first_call(args))
            results["header"] = header
            progress.advance()
            if groups:
                progress.step("matrix-product peak")
                results["gemm"] = measure.gemm_peak(args.dtype, n=2048 if args.quick else 4096,
                                                    runs=3 if args.quick else 5)
            progress.advance()
            results["groups"] = [_run_group(g, args, results["gemm"]["gflops"], progress)
                                 for g in groups]
            if n_cases:
                _add_memory(results["groups"], args, memory_reason, progress)
            if check:
                progress.step("memory check at L=S=32768")
                results["memory_check"] = memory_check(args)
                progress.advance()
    finally:
        progress.close()
    for group in results["groups"]:
        _add_ratios(group)
        group["scaling"] = _fit_scaling(group) if group["sweep"] else []
    results["headline"] = _headline(results["groups"])
    return results


def _run_group(group: Group, args, peak_gflops: float, progress: Progress) -> dict:
    usable, unavailable = _usable(group.impls)
    out = {"name": group.name, "sweep": group.sweep, "note": group.note, "impls": usable,
           "unavailable": unavailable, "cases": []}
    for problem in group.problems:
        progress.step(problem.label())
        arrays = impls.make_inputs(problem)
        calls, case_skipped = {}, {}
        for name in usable:
            try:
                calls[name] = impls.prepare(name, problem, arrays)
            except impls.Unavailable as exc:
                case_skipped[name] = str(exc)
        timings = measure.time_interleaved(
            calls, args.min_runs, args.min_time, max_runs=max(args.min_runs, 200),
            on_call=lambda done, planned, what: progress.show(done / planned, what))
        records = []
        for name in usable:
            record = {"impl": name}
            timing = timings.get(name, {"skipped": case_skipped.get(name, "not run")})
            if "skipped" in timing:
                record["skipped"] = timing["skipped"]
            else:
                seconds = timing["median_s"]
                flops = problem.flops()
                record.update(median_ms=seconds * 1e3, min_ms=timing["min_s"] * 1e3,
                              runs=timing["runs"], first_call_ms=timing["first_call_s"] * 1e3)
                if flops:
                    record["gflops"] = flops / seconds / 1e9
                    record["peak_share"] = record["gflops"] / peak_gflops
            records.append(record)
        out["cases"].append({"problem": problem.as_dict(), "results": records})
        del arrays, calls
        progress.advance()
    return out


def _add_memory(groups: list, args, reason, progress: Progress):
    jobs = []
    for gi, group in enumerate(groups):
        for ci, case in enumerate(group["cases"]):
            problem = {k: case["problem"][k] for k in Problem.__dataclass_fields__}
            for record in case["results"]:
                if "skipped" not in record and record["impl"] != "cuda":
                    jobs.append({"key": f"{gi}/{ci}/{record['impl']}", "impl": record["impl"],
                                 "problem": problem})
    if reason is not None:
        return
    progress.step(f"extra memory of one call ({len(jobs)} calls in a fresh process)")
    done = [0]

    def one_more():
        done[0] += 1
        progress.show(done[0] / max(len(jobs), 1), f"{done[0]}/{len(jobs)}")

    memory = measure.measure_memory(jobs, args.threads, on_result=one_more)
    for key, value in memory.items():
        gi, ci, impl = key.split("/")
        case = groups[int(gi)]["cases"][int(ci)]
        record = next(r for r in case["results"] if r["impl"] == impl)
        if "extra_bytes" in value:
            record["extra_mib"] = value["extra_bytes"] / measure.MiB
        else:
            record["memory_skipped"] = value["skipped"]
    progress.advance()


def memory_check(args) -> dict:
    """One call at B=1, H=1, L=S=32768, D=64 float32: extra memory against the limit."""
    problem = MEMORY_CHECK
    names = [n for n in ("numba", "torch") if impls.available(n) is None]
    jobs = [{"key": n, "impl": n, "problem": {k: getattr(problem, k)
                                              for k in Problem.__dataclass_fields__}}
            for n in names]
    memory = measure.measure_memory(jobs, args.threads)
    numba = memory.get("numba", {"skipped": impls.available("numba") or "not run"})
    result = {"problem": problem.as_dict(), "limit_mib": MEMORY_LIMIT_MIB,
              "score_matrix_mib": problem.length * problem.S * 4 / measure.MiB,
              "results": {name: ({"extra_mib": rec["extra_bytes"] / measure.MiB,
                                  "seconds": rec["seconds"]} if "extra_bytes" in rec else rec)
                          for name, rec in memory.items()}}
    result["passed"] = "extra_bytes" in numba and numba["extra_bytes"] < MEMORY_LIMIT_MIB * measure.MiB
    return result


# --- derived figures ---------------------------------------------------------------------------

def _add_ratios(group: dict):
    for case in group["cases"]:
        times = {r["impl"]: r["median_ms"] for r in case["results"] if "median_ms" in r}
        for record in case["results"]:
            if "median_ms" not in record:
                continue
            for base in RATIO_BASELINES:
                if base in times:
                    record[f"x_{base}"] = times[base] / record["median_ms"]


def _slope(xs, ys) -> float | None:
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y and y > 0]
    if len({p[0] for p in points}) < 2:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


def _fit_scaling(group: dict) -> list:
    """Exponent p of time ~ L^p and extra memory ~ L^p, per implementation and causal mode."""
    series = {}
    for case in group["cases"]:
        p = case["problem"]
        for record in case["results"]:
            if "median_ms" in record:
                key = (record["impl"], p["causal"])
                series.setdefault(key, []).append((p["length"], record["median_ms"],
                                                   record.get("extra_mib")))
    fits = []
    for (impl, causal), points in series.items():
        lengths = [x[0] for x in points]
        memory = [x[2] for x in points]
        fits.append({"impl": impl, "causal": causal, "lengths": lengths,
                     "time_exponent": _slope(lengths, [x[1] for x in points]),
                     "memory_exponent": _slope(lengths, memory)
                     if all(m is not None for m in memory) else None})
    return fits


def _headline(groups: list) -> dict:
    """Range of each fastattn implementation's speed ratios over the first group's cases."""
    if not groups:
        return {}
    head = {}
    for impl in ("numba", "cuda"):
        for base in RATIO_BASELINES:
            ratios = [r[f"x_{base}"] for case in groups[0]["cases"] for r in case["results"]
                      if r["impl"] == impl and f"x_{base}" in r]
            if ratios:
                head[f"{impl} vs {base}"] = [min(ratios), max(ratios)]
    return head


# --- reports -----------------------------------------------------------------------------------

def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _row_cells(record: dict) -> list[str]:
    if "skipped" in record:
        return [record["impl"], f"skipped: {record['skipped']}"]
    return [record["impl"],
            _fmt(record.get("median_ms"), ".2f" if record.get("median_ms", 0) < 100 else ".0f"),
            _fmt(record.get("gflops"), ".1f"),
            _fmt(record.get("peak_share") and record["peak_share"] * 100, ".0f"),
            _fmt(record.get("extra_mib"), ".1f" if (record.get("extra_mib") or 0) < 1000
                 else ".0f"),
            *[_fmt(record.get(f"x_{b}"), ".2f") for b in RATIO_BASELINES]]


COLUMNS = ["impl", "median ms", "GFLOP/s", "% peak", "extra MiB",
           *[f"x {b}" for b in RATIO_BASELINES]]


def render_text(results: dict) -> str:
    lines = []
    header = results.get("header", {})
    width = max((len(k) for k in header), default=0)
    for key, value in header.items():
        if isinstance(value, list):
            for i, item in enumerate(value):
                lines.append(f"{key if i == 0 else '':{width}}  {item}")
        else:
            lines.append(f"{key:{width}}  {value}")
    gemm = results.get("gemm")
    if gemm:
        lines.append(f"{'peak':{width}}  {gemm['gflops']:.1f} GFLOP/s: NumPy {gemm['name']} "
                     f"{gemm['n']}x{gemm['n']}, best of {gemm['runs']}, same threads, this run")
    if results.get("groups"):
        lines.append("")
        lines.append("Median of the timed calls; GFLOP/s = 4*B*H*L*S*D/time (half for causal); "
                     "% peak = share of the peak above;")
        lines.append("extra MiB = peak memory of one call beyond inputs and output; x NAME = "
                     "NAME's time / this time (> 1: faster).")
    for group in results.get("groups", []):
        lines.append("")
        lines.append(f"== {group['name']} ==" + (f"  ({group['note']})" if group["note"] else ""))
        for name, reason in group["unavailable"].items():
            lines.append(f"(not run: {name}: {reason})")
        for case in group["cases"]:
            lines.append(case["problem"]["label"])
            lines.extend(_text_table([_row_cells(r) for r in case["results"]]))
        if group.get("scaling"):
            lines.append("")
            lines.append("growth with L (least-squares slope on log-log): time ~2; memory ~2 "
                         "where the L x S scores are stored, at most ~1 for fused kernels")
            lines.append("(below 1 when a constant, the per-thread scratch, still outweighs the "
                         "O(L) part):")
            rows = [["impl", "causal", "time ~ L^p", "memory ~ L^p"]]
            for fit in group["scaling"]:
                rows.append([fit["impl"], "yes" if fit["causal"] else "no",
                             _fmt(fit["time_exponent"], ".2f"),
                             _fmt(fit["memory_exponent"], ".2f")])
            lines.extend(_text_table(rows, header=True))
    if results.get("headline"):
        lines.append("")
        lines.append("headline (range over the " + results["groups"][0]["name"] + " cases):")
        for key, (low, high) in results["headline"].items():
            lines.append(f"  {key}: {low:.2f}x to {high:.2f}x")
    check = results.get("memory_check")
    if check:
        lines.append("")
        lines.extend(_memory_check_lines(check))
    return "\n".join(lines)


def _memory_check_lines(check: dict) -> list[str]:
    p = check["problem"]
    lines = [f"memory check: one call at B={p['batch']} H={p['heads']} L=S={p['length']} "
             f"D={p['dim']} {p['dtype']} (the score matrix alone would be "
             f"{check['score_matrix_mib']:.0f} MiB); limit {check['limit_mib']} MiB "
             f"beyond inputs and output"]
    for name, rec in check["results"].items():
        if "extra_mib" in rec:
            lines.append(f"  {name:8} {rec['extra_mib']:8.1f} MiB extra  ({rec['seconds']:.2f} s)")
        else:
            lines.append(f"  {name:8} skipped: {rec.get('skipped')}")
    lines.append(f"  {'PASSED' if check['passed'] else 'FAILED'} (fastattn numba)")
    return lines


def _text_table(rows: list[list[str]], header: bool = False) -> list[str]:
    if not header:
        rows = [COLUMNS] + rows
    full = [r for r in rows if len(r) == len(rows[0])]
    widths = [max(len(r[i]) for r in full) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        if len(row) != len(widths):
            out.append(f"  {row[0]:<{widths[0]}}  {' '.join(row[1:])}")
        else:
            out.append("  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                        for i, (cell, w) in enumerate(zip(row, widths))))
    return out


def render_markdown(results: dict) -> str:
    header = results.get("header", {})
    lines = [f"### Run of {header.get('date', '?')}", "", "```", results["command"], "```", ""]
    for key, value in header.items():
        if key == "date":
            continue
        value = "; ".join(value) if isinstance(value, list) else value
        lines.append(f"- {key}: {value}")
    gemm = results.get("gemm")
    if gemm:
        lines.append(f"- measured peak: {gemm['gflops']:.1f} GFLOP/s (NumPy {gemm['name']} "
                     f"{gemm['n']}x{gemm['n']}, best of {gemm['runs']}, same threads, same run)")
    for group in results.get("groups", []):
        lines += ["", f"#### {group['name']}", ""]
        if group["note"]:
            lines += [group["note"], ""]
        for name, reason in group["unavailable"].items():
            lines += [f"Not run: {name} ({reason}).", ""]
        lines.append("| case | " + " | ".join(COLUMNS) + " |")
        lines.append("|---|" + "---|" + "---:|" * (len(COLUMNS) - 1))
        for case in group["cases"]:
            label = case["problem"]["label"]
            for record in case["results"]:
                cells = _row_cells(record)
                if len(cells) != len(COLUMNS):
                    cells = [cells[0], cells[1]] + [""] * (len(COLUMNS) - 2)
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
                label = ""
        if group.get("scaling"):
            lines += ["", "| impl | causal | time ~ L^p | extra memory ~ L^p |",
                      "|---|---|---:|---:|"]
            for fit in group["scaling"]:
                lines.append(f"| {fit['impl']} | {'yes' if fit['causal'] else 'no'} | "
                             f"{_fmt(fit['time_exponent'], '.2f')} | "
                             f"{_fmt(fit['memory_exponent'], '.2f')} |")
    if results.get("headline"):
        lines += ["", "Headline ratios (range over the " + results["groups"][0]["name"]
                  + " cases; > 1 means fastattn is faster):", ""]
        for key, (low, high) in results["headline"].items():
            lines.append(f"- {key}: {low:.2f}x to {high:.2f}x")
    if results.get("memory_check"):
        lines += ["", "```", *_memory_check_lines(results["memory_check"]), "```"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group = next((g for g in results.get("groups", []) if g["sweep"]), None)
    if group is None:
        print("--plot: nothing to plot (give several --lengths)", file=sys.stderr)
        return
    fig, (ax_speed, ax_memory) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {}
    for impl in group["impls"]:
        for causal in (False, True):
            pts = [(c["problem"]["length"], r) for c in group["cases"] for r in c["results"]
                   if r["impl"] == impl and c["problem"]["causal"] == causal and "median_ms" in r]
            if not pts:
                continue
            style = dict(marker="o", linestyle="--" if causal else "-",
                         label=f"{impl}{' causal' if causal else ''}")
            if impl in colors:
                style["color"] = colors[impl]
            line, = ax_speed.plot([L for L, _ in pts], [r.get("gflops", 0) for _, r in pts],
                                  **style)
            colors[impl] = line.get_color()
            style["color"] = colors[impl]
            mem = [(L, r["extra_mib"]) for L, r in pts if (r.get("extra_mib") or 0) > 0]
            if mem:
                ax_memory.plot([L for L, _ in mem], [m for _, m in mem], **style)
    peak = results.get("gemm", {}).get("gflops")
    if peak:
        ax_speed.axhline(peak, color="grey", linewidth=0.8, linestyle=":")
        ax_speed.annotate(f"{results['gemm']['name']} peak {peak:.0f}", (0.01, 0.97),
                          xycoords="axes fraction", va="top", fontsize=8, color="grey")
    for ax, ylabel in ((ax_speed, "GFLOP/s (4·B·H·L·S·D / time)"),
                       (ax_memory, "extra memory of one call (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L = S")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    header = results.get("header", {})
    first = group["cases"][0]["problem"]
    fig.suptitle(f"{group['name']}: B={first['batch']} H={first['heads']} D={first['dim']} "
                 f"{first['dtype']} · {header.get('cpu', '')} · {header.get('threads')} threads · "
                 f"{header.get('date', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    results = run(args)
    print(render_text(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(render_markdown(results))
        print(f"wrote {args.markdown}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    check = results.get("memory_check")
    return 1 if check and not check["passed"] else 0
