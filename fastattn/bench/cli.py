"""``python -m fastattn bench``: fastattn against NumPy and PyTorch, timed in one run.

Prints a header (CPU, threads, threading layer, BLAS, versions), this machine's matrix-product
peak measured in the same run, then for each case and implementation the median time, GFLOP/s,
the share of that peak, the extra memory of one call and the speed ratios against NumPy and
PyTorch; then how time and memory grow with the sequence length L (fitted exponents). With
--pipeline (and in --full) also the pipeline cases, timed back to back with no settle time: a
NumPy or PyTorch matmul then fastattn's attention, against the two alone, and fastattn's
multi-head layer against PyTorch's; and the attention cases alone with fastattn's quieting of
the other thread pools on and off (FASTATTN_QUIET_POOLS), in fresh processes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass

from . import impls
from . import measure
from . import report
from .impls import Problem

DEFAULT_LENGTHS = (1024, 4096, 8192)
QUICK_LENGTHS = (1024, 2048)
MEMORY_CHECK = Problem(op="attention", batch=1, heads=1, length=32768, dim=64)
MEMORY_LIMIT_MIB = 64
MEMORY_CHECK_BACKWARD = MEMORY_CHECK.with_(op="backward")
MEMORY_LIMIT_BACKWARD_MIB = 128
BACKWARD_OPS = (("backward", "backward"), ("forward+backward", "forward_backward"))

EPILOG = f"""\
implementations:
  numba    fastattn's fused CPU kernels (backend="numba")
  numpy    fastattn's NumPy reference (backend="numpy")
  formula  the plain NumPy formula softmax(q @ k.T * scale) @ v, written in place
  torch    torch.nn.functional.scaled_dot_product_attention (PyTorch's CPU flash kernel);
           a window, bottom-right alignment or ALiBi as the explicit mask or bias SDPA needs
  flex     torch.compile(flex_attention) on the CPU, the variants as mask_mod and score_mod
  cuda     fastattn on the GPU, inputs already there (only when a CUDA GPU is usable)
  Ratios "x numpy", "x formula", "x torch" are that implementation's time over this one's:
  above 1 means this one is faster.

measures:
  GFLOP/s counts 4*B*H*L*S*D per attention call (half that when causal), 2.5x that for the
  backward (FlashAttention's convention) and 3.5x for forward+backward; the peak is NumPy's
  matrix product (sgemm for float32) on the same threads in the same run. Extra memory is the
  growth of the peak resident set during one call, less its output, measured in a fresh
  process (Linux only); it grows at most like L for fused kernels, like L^2 for the formula.

before you run it:
  Unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE for this command only (they slow NumPy's BLAS
  when set), e.g.  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m fastattn bench
  Stop other work on the machine if you can. Figures are only comparable within one run: the
  implementations take turns call by call, so a change in load hits them all alike, but
  another run on another day (or another machine) sees other load, clocks and BLAS.

examples:
  python -m fastattn bench --quick           # under a minute on 2 idle cores
  python -m fastattn bench --transformers    # a Llama-like model end to end, fastattn vs sdpa
  python -m fastattn bench                   # float32, B=1, H=8, D=64, L=S=1024,4096,8192
  python -m fastattn bench --memory-check    # one call at H=1, L=S=32768: < {MEMORY_LIMIT_MIB} MiB extra?
                                             # (and one backward: < {MEMORY_LIMIT_BACKWARD_MIB} MiB?)
  python -m fastattn bench --backward --lengths 1024,4096 --impls numba,torch
                  # the backward, and forward+backward, against PyTorch's SDPA with requires_grad
  python -m fastattn bench --pipeline        # back to back as in a model: matmul then attention,
                                             # and the layer against PyTorch's
  python -m fastattn bench --lengths 512,2048 --causal --threads 1 --impls numba,torch
  python -m fastattn bench --lengths 8192 --causal --window 1023,0   # a sliding window
  python -m fastattn bench --lengths 8192 --variants  # causal, window, softcap, ALiBi in one run
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m fastattn bench --full \\
      --json bench/results.json --plot bench/results.png --markdown bench/RESULTS.md
                  # what bench/RESULTS.md shows: --markdown replaces the text between its
                  # "fastattn bench: begin/end" markers and leaves the rest of the file alone
  python -m fastattn bench --from-json bench/results.json --markdown report.md   # re-report
  python -m fastattn bench --flex --lengths 8192 --no-memory   # flex_attention vs PyTorch's
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


def _window(text: str) -> tuple:
    """LEFT[,RIGHT]: ints >= 0 or "none" (unbounded); RIGHT defaults to 0."""
    parts = text.split(",")
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"expected LEFT[,RIGHT], got {text!r}")
    sides = []
    for part in parts + (["0"] if len(parts) == 1 else []):
        part = part.strip().lower()
        if part == "none":
            sides.append(None)
            continue
        try:
            value = int(part)
        except ValueError:
            value = -1
        if value < 0:
            raise argparse.ArgumentTypeError(
                f"window sides are ints >= 0 or 'none', got {part!r} in {text!r}")
        sides.append(value)
    return tuple(sides)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastattn bench",
        description="fastattn against NumPy and PyTorch, timed in one run, with this machine's\n"
                    "own matrix-product peak and the extra memory of each call.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to run")
    what.add_argument("--quick", action="store_true",
                      help=f"a short run: L={','.join(map(str, QUICK_LENGTHS))}, fewer calls")
    what.add_argument("--full", action="store_true",
                      help="everything bench/RESULTS.md shows: the default cases, plus a float "
                           "mask, GQA, the multi-head layer, the variants, the backward, the pipeline "
                           "and --memory-check")
    what.add_argument("--pipeline", action="store_true",
                      help="only the pipeline cases (in --full): steps timed back to back with "
                           "no settle time, as in a model: NumPy's and PyTorch's matmul then "
                           "fastattn's attention, against the two alone; fastattn's layer "
                           "against PyTorch's; the attention cases alone with the pools' "
                           "quieting on and off")
    what.add_argument("--memory-check", action="store_true",
                      help=f"only the memory check: one call at B=1, H=1, L=S=32768, D=64 "
                           f"float32 must need < {MEMORY_LIMIT_MIB} MiB beyond inputs and output, "
                           f"one backward < {MEMORY_LIMIT_BACKWARD_MIB} MiB (exit status 1 if "
                           f"not, 2 if it cannot be measured here)")
    what.add_argument("--transformers", action="store_true",
                      help="only the transformers case: a Llama-like model (4 layers, hidden "
                           "1024, 16 heads, 4 key/value heads) end to end, "
                           "attn_implementation='fastattn' against 'sdpa': prefill at L=2048 "
                           "and 8192, 128 decode steps at a context of 4096, float32 and "
                           "bfloat16 (needs torch and transformers; --quick: small sizes)")
    what.add_argument("--backward", action="store_true",
                      help="the backward (from the forward's out and lse) and forward+backward "
                           "instead of the forward, against PyTorch's SDPA with requires_grad")
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
    what.add_argument("--flex", action="store_true",
                      help="instead, the flex_attention cases (causal, window 1024, causal + "
                           "softcap, 8 documents, prefix-LM) against fastattn's built-in path "
                           "(sdpa) and PyTorch's compiled flex_attention, and the first call "
                           "with a new mask function")
    what.add_argument("--mask", choices=("none", "float", "bool"), default="none",
                      help="an (L, S) mask broadcast over batch and heads (default none)")
    variants = parser.add_argument_group("attention variants (fastattn's arguments of the same "
                                         "names)")
    variants.add_argument("--window", type=_window, metavar="LEFT[,RIGHT]",
                          help="key j takes part only if i - LEFT <= j <= i + RIGHT (RIGHT "
                               "default 0, 'none' = unbounded): --causal --window 1023 is a "
                               "sliding window of 1024 keys")
    variants.add_argument("--softcap", type=_positive_float, metavar="C",
                          help="scores become C * tanh(scores / C) (Gemma 2 uses 50)")
    variants.add_argument("--alibi", action="store_true",
                          help="ALiBi with the standard slopes 2^(-8 (h + 1) / H)")
    variants.add_argument("--alignment", choices=("top_left", "bottom_right"),
                          default="top_left",
                          help="where queries sit among the keys (default top_left)")
    variants.add_argument("--variants", action="store_true",
                          help="one group at the largest length, causal: plain, window "
                               "(1023, 0) (or --window), softcap 30 (or --softcap), ALiBi and "
                               "bottom-right with L = S / 2, timed in one run (in --full)")
    what.add_argument("--impls", type=_name_list(impls.IMPLS["attention"]), metavar="NAME,...",
                      default=list(impls.IMPLS["attention"]),
                      help="implementations to compare (default: all usable here)")
    what.add_argument("--decode", action="store_true",
                      help="only the decode case: attention_with_kvcache, one query row, "
                           "Hq=32, Hkv=8, D=128, against PyTorch and the read bandwidth")
    what.add_argument("--decode-lengths", type=_int_list, metavar="S,...",
                      default=[4096, 32768, 131072], help="cache lengths of --decode "
                                                          "(default 4096,32768,131072)")
    what.add_argument("--decode-batches", type=_int_list, metavar="B,...", default=[1, 8],
                      help="batch sizes of --decode (default 1,8)")
    what.add_argument("--varlen", action="store_true",
                      help="only the varlen case: 16 sequences of lengths 64..2048 packed "
                           "(varlen_attention) against padded SDPA with a padding mask "
                           "(--heads, --kv-heads, --dim, --causal/--no-causal apply)")
    how = parser.add_argument_group("how")
    how.add_argument("--threads", type=int, metavar="N",
                     help="threads for Numba, NumPy's BLAS and PyTorch (default: all cores)")
    how.add_argument("--min-runs", type=int, metavar="N",
                     help="timed calls per implementation at least (default 5; 3 with --quick)")
    how.add_argument("--min-time", type=float, metavar="S",
                     help="seconds of timed calls per implementation at least, if --min-runs "
                          "are quicker (default 2; 0.3 with --quick)")
    how.add_argument("--max-time", type=float, metavar="S",
                     help="seconds of timed calls per implementation at most, as long as it "
                          "gets 3 calls (default 30; 5 with --quick): the NumPy reference "
                          "takes seconds per call at L=8192")
    how.add_argument("--jit", action="store_true",
                     help="also time the cold compile: the first call in a new process with an "
                          "empty Numba cache (in --full)")
    how.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    out.add_argument("--plot", metavar="FILE.png",
                     help="GFLOP/s and memory against L, log-log (needs matplotlib)")
    out.add_argument("--markdown", metavar="FILE",
                     help="write the report as Markdown; if FILE holds the markers "
                          f"{report.BEGIN} and {report.END}, only the text between them")
    out.add_argument("--note", metavar="TEXT",
                     help="a remark printed with the report, e.g. how busy the machine was")
    out.add_argument("--from-json", metavar="FILE",
                     help="run nothing: report a run saved with --json (text, --plot, --markdown)")
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
    if args.threads is not None:
        import numba

        if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
            parser.error(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} "
                         f"(Numba's thread pool here; set NUMBA_NUM_THREADS for more)")
    if args.lengths is None:
        args.lengths = list(QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    if args.min_runs is None:
        args.min_runs = 3 if args.quick else 5
    if args.min_time is None:
        args.min_time = 0.3 if args.quick else 2.0
    if args.max_time is None:
        args.max_time = 5.0 if args.quick else 30.0
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
    # An implementation whose calls of every case are also timed in one interleaved run (their
    # ratios to the first case then share the machine's state: on a busy machine the speed
    # drifts by 20% over the minutes the cases take one after the other).
    interleave: str = ""


def build_groups(args) -> list[Group]:
    causal_modes = [True] if args.causal else [False] if args.no_causal else [False, True]
    mask = None if args.mask == "none" else args.mask
    base = Problem(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim,
                   dtype=args.dtype, mask=mask, alignment=args.alignment, window=args.window,
                   softcap=args.softcap, alibi=args.alibi)
    chosen = tuple(args.impls)
    if args.memory_check or (args.pipeline and not args.full):
        return []

    def backward_groups(lengths):
        return [Group(name, [base.with_(op=op, length=L, causal=c)
                             for c in causal_modes for L in lengths],
                      sweep=len(lengths) > 1,
                      impls=tuple(i for i in chosen if i in impls.IMPLS[op]))
                for name, op in BACKWARD_OPS]
    if args.backward:
        return backward_groups(sorted(args.lengths))
    if args.variants and not args.full:
        return [_variants_group(args, chosen)]
    if args.flex:
        flex = base.with_(op="flex", flex="causal", mask=None)
        return [Group("flex attention", [flex.with_(flex=case, length=L)
                                         for case in impls.FLEX_CASES
                                         for L in sorted(args.lengths)],
                      impls=impls.IMPLS["flex"],
                      note="numba: fastattn.flex_attention with a block mask made once; sdpa: "
                           "fastattn's built-in path (is_causal, window, softcap; a bool "
                           "attn_mask for document and prefix); torch: PyTorch's flex_attention "
                           "under torch.compile (its compile is left out of the timings)")]
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
        groups.append(_variants_group(args, chosen))
        groups.extend(backward_groups(short))
    return groups


def _variants_group(args, chosen) -> Group:
    """Causal attention at the largest length, plain and with each variant, in one group (so
    in one interleaved run: the ratios to the plain case are what to read)."""
    L = max(args.lengths)
    causal = Problem(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim,
                     dtype=args.dtype, length=L, causal=True)
    problems = [causal, causal.with_(window=args.window or (1023, 0)),
                causal.with_(softcap=args.softcap or 30.0), causal.with_(alibi=True),
                causal.with_(length=L // 2, kv_length=L, alignment="bottom_right")]
    return Group("attention variants", problems, impls=tuple(i for i in chosen
                                                             if i in impls.IMPLS["attention"]),
                 note="read each variant against the plain causal case of the same run",
                 interleave="numba")


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
        self.drawn = 0.0

    def step(self, label: str):
        """A new step (one unit of work) begins."""
        self.step_label = label
        if self.enabled and not self.tty:
            print(f"[{self._elapsed()}] {label}", file=self.stream, flush=True)
        self.show(0.0, "")

    def show(self, fraction: float, detail: str):
        """Within the current step, ``fraction`` of it is done; ``detail`` says what runs."""
        now = time.perf_counter()
        if not self.tty or (detail and now - self.drawn < 0.1):  # at most 10 redraws a second
            return
        self.drawn = now
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

    def message(self, text: str):
        """A line for the user, shown whether or not the bar is."""
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r" + " " * width + "\r")
        print(text, file=self.stream, flush=True)

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


def _jit_times(args, cold: bool) -> dict:
    """fastattn's import and first call in a new process (kernels cached), and with --jit the
    same with an empty cache (the cold compile)."""
    if impls.available("numba") is not None:
        return {}
    small = Problem(heads=1, length=256, dtype=args.dtype)
    impls.prepare("numba", small, impls.make_inputs(small))()  # fills the cache if empty
    out = {}
    cases = [("cached", False)] + ([("cold", True)] if cold else [])
    for name, is_cold in cases:
        t = measure.first_call_in_new_process(args.dtype, cold=is_cold)
        if "skipped" in t:
            out[f"fastattn first call ({name})"] = t["skipped"]
        elif is_cold:
            out["fastattn cold compile"] = (f"{t['first_call_s']:.2f} s: the first call in a new "
                                            f"process with an empty Numba cache")
        else:
            out["fastattn first call"] = (f"{t['first_call_s']:.2f} s in a new process, kernels "
                                          f"cached (import {t['import_s']:.2f} s)")
    return out


def _flex_jit_times() -> dict:
    out = {}
    for name, t in impls.flex_first_calls().items():
        if name == "warm-up":
            continue
        label = f"fastattn flex first call ({name})"
        out[label] = t["skipped"] if "skipped" in t else (
            f"{t['first_call_s']:.2f} s (block mask and call, B=1 H=8 L=1024; import "
            f"{t['import_s']:.2f} s)")
    return out


def run(args) -> dict:
    """Run the benchmark the options describe; every figure in one dict (what --json writes)."""
    groups = build_groups(args)
    wanted = sorted({i for g in groups for i in g.impls} | ({"numba"} if args.memory_check or
                                                             args.full else set()))
    pipeline = args.pipeline or args.full
    if ("torch" in wanted or pipeline) and impls.available("torch") is None:
        import torch  # noqa: F401  (imported before the threads are set, so they apply to it)
    memory_reason = None if not args.no_memory else "--no-memory"
    memory_reason = memory_reason or measure.memory_supported()
    check = args.memory_check or args.full
    n_cases = sum(len(g.problems) for g in groups)
    total = 3 + n_cases + (1 if memory_reason is None and n_cases else 0) + (2 if check else 0) \
        + (1 if pipeline else 0) + sum(1 for g in groups if g.interleave in g.impls)
    progress = Progress(total, enabled=not args.no_progress)
    started = time.perf_counter()
    results = {"command": "python -m fastattn bench " + shlex.join(args.argv),
               "options": {k: v for k, v in vars(args).items() if k != "argv"}}
    try:
        with measure.threads_limited(args.threads):
            progress.step("the machine")
            header = measure.system_header(args.threads)
            busy = measure.busy_warning()
            if busy:
                header["warning"] = busy
                progress.message(f"warning: {busy}")
            progress.show(0.5, "JIT: fastattn's first call in a new process")
            header.update(_jit_times(args, cold=args.jit or args.full))
            if args.flex:
                header.update(_flex_jit_times())
            results["header"] = header
            progress.advance()
            gemm = {"n": 2048 if args.quick else 4096, "runs": 3 if args.quick else 5}
            if groups:
                progress.step("matrix-product peak")
                start_peak = measure.gemm_peak(args.dtype, **gemm)
            progress.advance()
            results["groups"] = [_run_group(g, args, progress) for g in groups]
            if groups:
                # Measured again at the end: the best of the two is the peak (other load on
                # the machine can only slow a measurement down).
                progress.step("matrix-product peak, again")
                end_peak = measure.gemm_peak(args.dtype, **gemm)
                results["gemm"] = dict(start_peak, gflops=max(start_peak["gflops"],
                                                              end_peak["gflops"]),
                                       start_gflops=start_peak["gflops"],
                                       end_gflops=end_peak["gflops"])
                progress.advance()
            if n_cases:
                _add_memory(results["groups"], args, memory_reason, progress)
            if pipeline:
                progress.step("pipeline: back to back, no settle time")
                results["pipeline"] = run_pipeline(args, progress)
                progress.advance()
            if check:
                progress.step("memory check at L=S=32768")
                results["memory_check"] = memory_check(args)
                progress.advance()
                progress.step("memory check of the backward at L=S=32768")
                results["memory_check_backward"] = memory_check(
                    args, MEMORY_CHECK_BACKWARD, MEMORY_LIMIT_BACKWARD_MIB)
                progress.advance()
    finally:
        progress.close()
    for group in results["groups"]:
        report.add_ratios(group, results["gemm"]["gflops"])
        group["scaling"] = report.fit_scaling(group) if group["sweep"] else []
    results["headline"] = report.headline(results["groups"])
    if hasattr(os, "getloadavg"):
        results["header"]["load average at the end"] = " ".join(
            f"{x:.2f}" for x in os.getloadavg())
    results["header"]["this run took"] = f"{time.perf_counter() - started:.0f} s"
    if args.note:
        results["note"] = args.note
    return results


def _run_group(group: Group, args, progress: Progress) -> dict:
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
            max_time=args.max_time,
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
            records.append(record)
        out["cases"].append({"problem": problem.as_dict(), "results": records})
        del arrays, calls
        progress.advance()
    if group.interleave in usable:
        out["interleaved"] = _run_interleaved(group, args, progress)
    return out


def _run_interleaved(group: Group, args, progress: Progress) -> dict:
    """``group.interleave``'s calls of all the group's cases, timed in one interleaved run: the
    median of each and its ratio to the first case's."""
    name = group.interleave
    progress.step(f"{name}: the {len(group.problems)} cases interleaved")
    calls, labels = {}, []
    for problem in group.problems:
        label = problem.label()
        try:
            calls[label] = impls.prepare(name, problem, impls.make_inputs(problem))
        except impls.Unavailable:
            continue
        labels.append(label)
    timings = measure.time_interleaved(
        calls, args.min_runs, args.min_time, max_runs=max(args.min_runs, 200),
        max_time=args.max_time,
        on_call=lambda done, planned, what: progress.show(done / planned, what))
    del calls
    first = timings.get(labels[0], {}).get("median_s") if labels else None
    cases = []
    for label in labels:
        timing = timings[label]
        if "skipped" in timing:
            cases.append({"label": label, "skipped": timing["skipped"]})
            continue
        cases.append({"label": label, "median_ms": timing["median_s"] * 1e3,
                      "runs": timing["runs"],
                      "x_first": timing["median_s"] / first if first else None})
    progress.advance()
    return {"impl": name, "cases": cases}


# --- pipeline ----------------------------------------------------------------------------------

PIPELINE_GOALS = {"pair": 1.10, "layers": 1.2, "standalone": 1.05}
# The attention benchmark's own cases, timed alone with the pools' quieting on and off.
STANDALONE_LENGTHS = (1024, 4096)


def run_pipeline(args, progress: Progress) -> list:
    """The pipeline cases (impls.pipeline_cases), timed back to back (measure.time_back_to_back).

    "pair": the first step alone, the second alone and the two one after the other; the ratio
    is the pair's time over the sum alone (goal: at most PIPELINE_GOALS["pair"]). "layers":
    fastattn's layer and PyTorch's, each back to back; the ratio is PyTorch's time over
    fastattn's (goal: at least PIPELINE_GOALS["layers"]).
    """
    calls, rounds = (7, 3) if args.quick else (10, 3)
    records = []
    for case in impls.pipeline_cases(args.dtype):
        record = {"name": case["name"], "kind": case.get("kind")}
        if "skipped" in case:
            record["skipped"] = case["skipped"]
            records.append(record)
            continue
        steps = case["steps"]
        if case["kind"] == "pair":
            sequences = {"first alone": [steps["matmul"]],
                         "attention alone": [steps["attention"]],
                         "one after the other": [steps["matmul"], steps["attention"]]}
        else:
            sequences = {name: [fn] for name, fn in steps.items()}
        timing = measure.time_back_to_back(
            sequences, calls=calls, rounds=rounds,
            on_call=lambda fraction, what: progress.show(fraction, f"{case['name']}: {what}"))
        record["ms"] = {name: t["median_s"] * 1e3 for name, t in timing.items()}
        record["runs"] = min(t["runs"] for t in timing.values())
        ms = record["ms"]
        if case["kind"] == "pair":
            record["sum_alone_ms"] = ms["first alone"] + ms["attention alone"]
            record["ratio"] = ms["one after the other"] / record["sum_alone_ms"]
            record["met"] = record["ratio"] <= PIPELINE_GOALS["pair"]
        else:
            record["ratio"] = ms["torch"] / ms["fastattn"]
            record["met"] = record["ratio"] >= PIPELINE_GOALS["layers"]
        records.append(record)
    return records + run_standalone(args, progress)


def run_standalone(args, progress: Progress) -> list:
    """The attention benchmark's cases alone (settle time before each call, as the benchmark
    times them) with the quieting of the other pools on and off, in fresh processes taking
    turns (measure.standalone_quieting_on_off): the ratio is on / off (goal: at most
    PIPELINE_GOALS["standalone"], i.e. not worse beyond the noise; the median of the rounds' own
    ratios, their range beside it)."""
    wanted = ["numba"] + (["torch"] if impls.available("torch") is None else [])
    cases = []
    for length in ((256,) if args.quick else STANDALONE_LENGTHS):
        for causal in (False, True):
            p = Problem(batch=1, heads=8, length=length, dim=64, dtype=args.dtype, causal=causal)
            for impl in wanted:
                cases.append({"key": f"{impl} {p.label()}", "impl": impl,
                              "problem": {k: getattr(p, k) for k in Problem.__dataclass_fields__}})
    timing = measure.standalone_quieting_on_off(
        cases, args.threads, rounds=2 if args.quick else 7, min_runs=3 if args.quick else 7,
        on_round=lambda r, n, setting: progress.show(
            (2 * r + 0.5) / (2 * n), f"standalone, quieting {setting}, round {r + 1}/{n}"))
    records = []
    for case in cases:
        t = timing[case["key"]]
        record = {"name": case["key"], "kind": "standalone"}
        if "skipped" in t:
            record["skipped"] = t["skipped"]
        else:
            record["ms"] = {"on": t["on"] * 1e3, "off": t["off"] * 1e3}
            record["rounds"] = t["rounds"]
            record["ratio"] = t["ratio"]
            record["ratio_range"] = [min(t["ratios"]), max(t["ratios"])]
            record["met"] = record["ratio"] <= PIPELINE_GOALS["standalone"]
        records.append(record)
    return records


def _met(record: dict) -> str:
    return "met" if record["met"] else "NOT met"


def pipeline_lines(records: list, markdown: bool = False) -> list:
    """The pipeline figures as text lines (or a Markdown table)."""
    rows = []
    for r in records:
        if "skipped" in r:
            rows.append((r["name"], "skipped: " + r["skipped"], "", ""))
        elif r["kind"] == "pair":
            ms = r["ms"]
            rows.append((r["name"], f"{ms['first alone']:.2f} + {ms['attention alone']:.2f} = "
                                    f"{r['sum_alone_ms']:.2f} ms alone; "
                                    f"{ms['one after the other']:.2f} ms one after the other",
                         f"{r['ratio']:.2f}x the sum",
                         f"goal <= {PIPELINE_GOALS['pair']:.2f}: {_met(r)}"))
        elif r["kind"] == "standalone":
            ms = r["ms"]
            rows.append((f"alone: {r['name']}", f"quieting on {ms['on']:.2f} ms, off "
                                                f"{ms['off']:.2f} ms",
                         f"{r['ratio']:.2f}x off (rounds {r['ratio_range'][0]:.2f}-"
                         f"{r['ratio_range'][1]:.2f})",
                         f"goal <= {PIPELINE_GOALS['standalone']:.2f}: {_met(r)}"))
        else:
            ms = r["ms"]
            rows.append((r["name"], f"fastattn {ms['fastattn']:.1f} ms, torch {ms['torch']:.1f} ms",
                         f"{r['ratio']:.2f}x torch",
                         f"goal >= {PIPELINE_GOALS['layers']:.1f}x: {_met(r)}"))
    runs = min((r["runs"] for r in records if "runs" in r), default=0)
    rounds = min((r["rounds"] for r in records if "rounds" in r), default=0)
    title = (f"pipeline: back to back, no settle time between calls (median of {runs} calls "
             f"each, the cases taking turns); \"alone\": the attention benchmark's cases timed "
             f"alone with the other pools' quieting on and off (FASTATTN_QUIET_POOLS), fresh "
             f"processes taking turns, median of {rounds} rounds' on / off")
    if markdown:
        lines = [f"### {title[0].upper()}{title[1:]}", "", "| case | time | ratio | goal |",
                 "|---|---|---:|---|"]
        lines += [f"| {' | '.join(row)} |" for row in rows]
        return lines
    lines = ["", title]
    for name, timing, ratio, goal in rows:
        lines.append(f"  {name}")
        lines.append(f"    {timing}" + (f"  ->  {ratio}  ({goal})" if ratio else ""))
    return lines


def _add_memory(groups: list, args, reason, progress: Progress):
    jobs = []
    for gi, group in enumerate(groups):
        for ci, case in enumerate(group["cases"]):
            problem = {k: case["problem"][k] for k in Problem.__dataclass_fields__}
            for record in case["results"]:
                if "skipped" not in record and record["impl"] != "cuda" and \
                        case["problem"]["op"] != "flex":  # (torch.compile per fresh process)
                    jobs.append({"key": f"{gi}/{ci}/{record['impl']}", "impl": record["impl"],
                                 "problem": problem})
    if reason is not None:
        for group in groups:
            group["memory_skipped"] = reason
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


def memory_check(args, problem: Problem = MEMORY_CHECK, limit_mib: int = MEMORY_LIMIT_MIB) -> dict:
    """One call at B=1, H=1, L=S=32768, D=64 float32: extra memory against the limit."""
    names = [n for n in ("numba", "torch") if impls.available(n) is None]
    jobs = [{"key": n, "impl": n, "problem": {k: getattr(problem, k)
                                              for k in Problem.__dataclass_fields__}}
            for n in names]
    memory = measure.measure_memory(jobs, args.threads)
    numba = memory.get("numba", {"skipped": impls.available("numba") or "not run"})
    result = {"problem": problem.as_dict(), "limit_mib": limit_mib,
              "score_matrix_mib": problem.length * problem.S * 4 / measure.MiB,
              "results": {name: ({"extra_mib": rec["extra_bytes"] / measure.MiB,
                                  "seconds": rec["seconds"]} if "extra_bytes" in rec else rec)
                          for name, rec in memory.items()}}
    # None: could not be measured here (no /proc, no numba): neither passed nor failed.
    result["passed"] = (numba["extra_bytes"] < limit_mib * measure.MiB
                        if "extra_bytes" in numba else None)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    if args.transformers:
        from .transformers_case import main as transformers_main
        return transformers_main(args)
    if args.decode or args.varlen:
        from . import decode
        results = decode.run(args)
        print(decode.render(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
            print(f"\nwrote {args.json}")
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        if args.note:
            results["note"] = args.note
    else:
        results = run(args)
    print(report.render_text(results))
    if results.get("pipeline"):
        print("\n".join(pipeline_lines(results["pipeline"])))
    if args.json and not args.from_json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    if args.plot and report.plot(results, args.plot):
        print(f"wrote {args.plot}")
    if args.markdown:
        section = report.render_markdown(results, plot_path=args.plot,
                                         markdown_path=args.markdown)
        if results.get("pipeline"):
            section = section.rstrip("\n") + "\n\n" + "\n".join(
                pipeline_lines(results["pipeline"], markdown=True)) + "\n"
        report.write_markdown(args.markdown, section)
        print(f"wrote {args.markdown}")
    checks = [results[key] for key in ("memory_check", "memory_check_backward") if key in results]
    if any(check["passed"] is False for check in checks):
        return 1
    return 2 if any(check["passed"] is None for check in checks) else 0
