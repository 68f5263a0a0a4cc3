"""How ``python -m fastattn bench`` reports a run: derived figures, text, Markdown and the plot.

Everything here works on the results dict that ``fastattn.bench.run`` returns (and ``--json``
writes), so a saved run can be reported again with ``--from-json``.
"""
from __future__ import annotations

import math
import os
import sys

RATIO_BASELINES = ("numpy", "formula", "torch")


# --- derived figures ---------------------------------------------------------------------------

def add_ratios(group: dict, peak_gflops: float):
    """Speed ratios against each baseline, and the share of the measured peak."""
    for case in group["cases"]:
        times = {r["impl"]: r["median_ms"] for r in case["results"] if "median_ms" in r}
        for record in case["results"]:
            if "median_ms" not in record:
                continue
            if "gflops" in record:
                record["peak_share"] = record["gflops"] / peak_gflops
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


def fit_scaling(group: dict) -> list:
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


def headline(groups: list) -> dict:
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

def _peak_text(gemm: dict) -> str:
    text = (f"{gemm['gflops']:.1f} GFLOP/s: NumPy {gemm['name']} {gemm['n']}x{gemm['n']}, "
            f"best of {gemm['runs']}")
    if "start_gflops" in gemm:
        text += (f" at the start ({gemm['start_gflops']:.1f}) and at the end "
                 f"({gemm['end_gflops']:.1f}) of the run")
    return text + ", on the same threads"


def _over_peak(results: dict) -> bool:
    return any(r.get("peak_share", 0) > 1 for g in results.get("groups", [])
               for c in g["cases"] for r in c["results"])


OVER_PEAK = ("A share of the peak above 100% means that other work on the machine slowed both "
             "measurements of the peak: the run was disturbed.")


def _span(span) -> str:
    low, high = span
    return f"{low:.2f}x" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}x to {high:.2f}x"


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
    lines = [f"note: {results['note']}", ""] if results.get("note") else []
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
        lines.append(f"{'peak':{width}}  {_peak_text(gemm)}")
    if results.get("groups"):
        lines.append("")
        lines.append("Median of the timed calls; GFLOP/s = 4*B*H*L*S*D/time (half for causal); "
                     "% peak = share of the peak above;")
        lines.append("extra MiB = peak memory of one call beyond inputs and output; x NAME = "
                     "NAME's time / this time (> 1: faster).")
        if _over_peak(results):
            lines.append(OVER_PEAK)
    for group in results.get("groups", []):
        lines.append("")
        lines.append(f"== {group['name']} ==" + (f"  ({group['note']})" if group["note"] else ""))
        for name, reason in group["unavailable"].items():
            lines.append(f"(not run: {name}: {reason})")
        if group.get("memory_skipped"):
            lines.append(f"(extra memory not measured: {group['memory_skipped']})")
        if not group["impls"]:
            lines.append("(no implementation chosen is usable here)")
            continue
        for case in group["cases"]:
            lines.append(case["problem"]["label"])
            lines.extend(_text_table([_row_cells(r) for r in case["results"]]))
        if group.get("interleaved"):
            lines.append("")
            lines.append(_interleaved_title(group["interleaved"]))
            lines.extend(_text_table(_interleaved_rows(group["interleaved"]), header=True))
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
        for key, span in results["headline"].items():
            lines.append(f"  {key}: {_span(span)}")
    for key in ("memory_check", "memory_check_backward"):
        if results.get(key):
            lines.append("")
            lines.extend(_memory_check_lines(results[key]))
    return "\n".join(lines)


def _interleaved_title(interleaved: dict) -> str:
    return (f"{interleaved['impl']}, every case in one interleaved run (x first = this case's "
            f"time / the first case's)")


def _interleaved_rows(interleaved: dict) -> list[list[str]]:
    rows = [["case", "median ms", "runs", "x first"]]
    for case in interleaved["cases"]:
        if "skipped" in case:
            rows.append([case["label"], "skipped", "", case["skipped"]])
        else:
            rows.append([case["label"], _fmt(case["median_ms"], ".0f"), str(case["runs"]),
                         _fmt(case["x_first"], ".2f")])
    return rows


def _memory_check_lines(check: dict) -> list[str]:
    p = check["problem"]
    what = "one backward call" if p.get("op") == "backward" else "one call"
    lines = [f"memory check: {what} at B={p['batch']} H={p['heads']} L=S={p['length']} "
             f"D={p['dim']} {p['dtype']} (the score matrix alone would be "
             f"{check['score_matrix_mib']:.0f} MiB); limit {check['limit_mib']} MiB "
             f"beyond inputs and output"]
    for name, rec in check["results"].items():
        if "extra_mib" in rec:
            lines.append(f"  {name:8} {rec['extra_mib']:8.1f} MiB extra  ({rec['seconds']:.2f} s)")
        else:
            lines.append(f"  {name:8} skipped: {rec.get('skipped')}")
    verdict = {True: "PASSED", False: "FAILED", None: "NOT MEASURED"}[check["passed"]]
    lines.append(f"  {verdict} (fastattn numba)")
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


BEGIN, END = "<!-- fastattn bench: begin -->", "<!-- fastattn bench: end -->"


def write_markdown(path: str, section: str):
    """Write the report to ``path``; if the file holds the begin/end markers, replace only what
    lies between them (so bench/RESULTS.md keeps its own text around the figures)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    if BEGIN in text and END in text.split(BEGIN, 1)[1]:
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        text = f"{before}{BEGIN}\n{section}{END}{after}"
    else:
        text = section
    with open(path, "w") as f:
        f.write(text)


def render_markdown(results: dict, plot_path: str | None = None,
                    markdown_path: str | None = None) -> str:
    header = results.get("header", {})
    lines = [f"### Run of {header.get('date', '?')}", "", "```", results["command"], "```", ""]
    if results.get("note"):
        lines += [f"**Note:** {results['note']}", ""]
    if plot_path:
        rel = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(markdown_path or ".")))
        lines += [f"![GFLOP/s and extra memory against L]({rel})", ""]
    for key, value in header.items():
        if key == "date":
            continue
        value = "; ".join(value) if isinstance(value, list) else value
        lines.append(f"- {key}: {value}")
    gemm = results.get("gemm")
    if gemm:
        lines.append(f"- measured peak: {_peak_text(gemm)}")
    if _over_peak(results):
        lines += ["", OVER_PEAK]
    for group in results.get("groups", []):
        lines += ["", f"#### {group['name']}", ""]
        if group["note"]:
            lines += [group["note"], ""]
        for name, reason in group["unavailable"].items():
            lines += [f"Not run: {name} ({reason}).", ""]
        if group.get("memory_skipped"):
            lines += [f"Extra memory not measured ({group['memory_skipped']}).", ""]
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
        if group.get("interleaved"):
            rows = _interleaved_rows(group["interleaved"])
            lines += ["", _interleaved_title(group["interleaved"]) + ":", "",
                      "| " + " | ".join(rows[0]) + " |", "|---|---:|---:|---:|"]
            lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
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
        for key, span in results["headline"].items():
            lines.append(f"- {key}: {_span(span)}")
    for key in ("memory_check", "memory_check_backward"):
        if results.get(key):
            lines += ["", "```", *_memory_check_lines(results[key]), "```"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> bool:
    """GFLOP/s and extra memory against L (log-log) for the first group that sweeps L."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group = next((g for g in results.get("groups", []) if g["sweep"]), None)
    if group is None:
        print("--plot: nothing to plot (give several --lengths)", file=sys.stderr)
        return False
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
    lengths = sorted({c["problem"]["length"] for c in group["cases"]})
    memory = [y for line in ax_memory.lines for y in line.get_ydata()]
    if memory and len(lengths) > 1:
        # Guides: what growth like L and like L^2 looks like, from the smallest length.
        x0, x1 = lengths[0], lengths[-1]
        base = math.sqrt(min(memory) * max(memory)) / (x1 / x0)
        for power, text in ((1, "∝ L"), (2, "∝ L²")):
            ax_memory.plot([x0, x1], [base, base * (x1 / x0) ** power], color="grey",
                           linewidth=0.8, linestyle=":")
            ax_memory.annotate(text, (x1, base * (x1 / x0) ** power), fontsize=8, color="grey",
                               ha="right", va="bottom")
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
    return True
