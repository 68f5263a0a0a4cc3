"""``python -m fastattn demo``: the maths of attention on words small enough to check by hand.

Everything below goes through the public API (``fastattn.similarity``, ``softmax``,
``attention_weights``, ``scaled_dot_product_attention``).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import fastattn

WORDS_2D = {"cherry": (1.0, 4.0), "orange": (0.0, 3.0), "phone": (3.0, 0.0)}
WORDS_3D = {"orange": (0.0, 3.0, 0.0), "phone": (4.0, 0.0, 0.0), "apple": (2.0, 2.0, 0.0),
            "and": (0.0, 0.0, 2.0), "an": (0.0, 0.0, 3.0)}
APPLE_2D = np.array([2.0, 2.0])
PLOT_FILE = "fastattn-demo.png"
MASKS_FILE = "fastattn-masks.png"
# The pictures of --masks: (title, L, S, keyword arguments of keys_seen / the attention).
PATTERNS = [
    ("is_causal=True\n(top-left: p(i) = i)", 6, 10, dict(is_causal=True)),
    ('is_causal=True,\nalignment="bottom_right"\n(p(i) = i + S - L)', 6, 10,
     dict(is_causal=True, alignment="bottom_right")),
    ("is_causal=True, window=(3, 0)\n(a sliding window of 4 keys)", 10, 10,
     dict(is_causal=True, window=(3, 0))),
]
CONTEXTS_2D = {"an apple and an orange": ("orange", np.array([0.0, 3.0])),
               "an apple phone": ("phone", np.array([4.0, 0.0]))}


def table(title: str, rows: list[str], cols: list[str], values: np.ndarray, fmt="{:7.3f}") -> str:
    width = max(8, *(len(c) + 1 for c in cols))
    lines = [title, " " * 9 + "".join(f"{c:>{width}}" for c in cols)]
    for name, row in zip(rows, np.atleast_2d(values)):
        lines.append(f"{name:>8} " + "".join(f"{fmt.format(x):>{width}}" for x in row))
    return "\n".join(lines)


def moved_apple(context_vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apple's new position when it attends over {context word, apple} (cosine, scale 1)."""
    keys = np.stack([context_vector, APPLE_2D])
    query = APPLE_2D[None, :]
    weights = fastattn.attention_weights(query, keys, similarity="cosine", scale=1.0)[0]
    new = fastattn.scaled_dot_product_attention(query, keys, keys, similarity="cosine",
                                                scale=1.0)[0]
    return weights, new


def worked_example() -> str:
    out = []
    names = list(WORDS_2D)
    words = np.array(list(WORDS_2D.values()))
    out.append("1. Similarity of 2-d words: cherry (1,4), orange (0,3), phone (3,0)\n")
    for kind, label in (("dot", "dot product q.k"), ("scaled_dot", "scaled dot product q.k / sqrt(2)"),
                        ("cosine", "cosine similarity q.k / (|q| |k|)")):
        out.append(table(label, names, names, fastattn.similarity(words, words, kind)) + "\n")

    out.append("2. Softmax turns coefficients into weights that sum to one\n")
    for coefficients in ((1.0, 0.71), (1.0, -1.0)):
        w = fastattn.softmax(np.array(coefficients))
        out.append(f"   softmax{coefficients} = ({w[0]:.3f}, {w[1]:.3f})   sum = {w.sum():.3f}")
    out.append("")

    names3 = list(WORDS_3D)
    words3 = np.array(list(WORDS_3D.values()))
    out.append("3. 3-d words: orange (0,3,0), phone (4,0,0), apple (2,2,0), and (0,0,2), an (0,0,3)\n")
    out.append(table("cosine similarity", names3, names3,
                     fastattn.similarity(words3, words3, "cosine")) + "\n")
    sentence = ["orange", "apple", "and", "an"]
    x = np.array([WORDS_3D[w] for w in sentence])
    weights = fastattn.attention_weights(x, x, similarity="cosine", scale=1.0)
    out.append(table('attention weights of "an apple and an orange" (rows attend over columns; '
                     "cosine, scale 1)", sentence, sentence, weights) + "\n")

    out.append("4. In 2-d, apple (2,2) attends over the words of its sentence and moves\n")
    for text, (other, vector) in CONTEXTS_2D.items():
        w, new = moved_apple(vector)
        out.append(f'   "{text}": weights {other} {w[0]:.3f}, apple {w[1]:.3f} -> apple moves from '
                   f"(2.00, 2.00) to ({new[0]:.2f}, {new[1]:.2f}), toward {other}")
    return "\n".join(out)


def figure():
    """The 2-d words and the moves of apple, as a matplotlib figure (title and labels inside)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'fastattn[bench]' or matplotlib")
    fig, ax = plt.subplots(figsize=(5, 5))
    points = {"orange": (0, 3), "phone": (4, 0), "apple": tuple(APPLE_2D), "cherry": (1, 4)}
    for name, (px, py) in points.items():
        ax.scatter(px, py, s=60)
        ax.annotate(name, (px, py), textcoords="offset points", xytext=(6, 6))
    label_offsets = {"orange": (-110, 4), "phone": (6, -24)}  # keep the labels off the arrows
    for text, (other, vector) in CONTEXTS_2D.items():
        _, new = moved_apple(vector)
        ax.annotate("", xy=new, xytext=APPLE_2D, arrowprops=dict(arrowstyle="->", lw=1.5))
        ax.annotate(f'apple in\n"{text}"', new, textcoords="offset points",
                    xytext=label_offsets[other], fontsize=8)
    ax.set_xlim(-0.5, 5)
    ax.set_ylim(-0.5, 5)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.set_xlabel("feature 1")
    ax.set_ylabel("feature 2")
    ax.set_title("Attention moves apple toward its context\n(cosine similarity, scale 1)",
                 fontsize=11)
    fig.tight_layout()
    return fig


def plot(path: str) -> None:
    fig = figure()
    fig.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


def masks_figure():
    """Which keys each query sees, for causal top-left, bottom-right with L < S, and a sliding
    window: the weights of the numba backend (or the reference) where they are non-zero."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--masks needs matplotlib: pip install 'fastattn[bench]' or matplotlib")
    fig, axes = plt.subplots(1, len(PATTERNS), figsize=(4 * len(PATTERNS), 3.6))
    rng = np.random.default_rng(0)
    for ax, (title, L, S, kw) in zip(axes, PATTERNS):
        q, k = rng.standard_normal((L, 4)), rng.standard_normal((S, 4))
        seen = fastattn.attention_weights(q, k, **kw) > 0
        expected = fastattn.reference.keys_seen(L, S, kw.get("is_causal", False),
                                                kw.get("alignment", "top_left"),
                                                kw.get("window"))
        assert np.array_equal(seen, expected), "the kernel and the reference disagree"
        ax.imshow(seen, cmap="Blues", vmin=0, vmax=1.3, aspect="equal")
        ax.set_xticks(range(S))
        ax.set_yticks(range(L))
        ax.set_xticks(np.arange(-0.5, S), minor=True)
        ax.set_yticks(np.arange(-0.5, L), minor=True)
        ax.grid(which="minor", color="white", lw=1)
        ax.tick_params(which="minor", length=0)
        ax.set_xlabel(f"key j (S = {S})")
        ax.set_ylabel(f"query i (L = {L})")
        ax.set_title(title, fontsize=10)
    fig.suptitle("Which keys each query sees (blue: key j takes part in row i)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_masks(path: str) -> None:
    fig = masks_figure()
    fig.savefig(path, dpi=110)
    print(f"\nmask pictures written to {path}")


def timing(batch=1, heads=8, length=1024, dim=64) -> str:
    """One moderate size, numba against the NumPy reference (after a warm-up call each)."""
    if "numba" not in fastattn.backends():
        return "numba is not usable here: no timing"
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((batch, heads, length, dim), dtype=np.float32) for _ in range(3))
    lines = [f"5. Timing: B={batch}, H={heads}, L=S={length}, D={dim}, float32, causal "
             "(median of 5 calls after a warm-up)"]
    medians = {}
    for backend in ("numba", "numpy"):
        t0 = time.perf_counter()
        fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
        first = time.perf_counter() - t0
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
            times.append(time.perf_counter() - t0)
        medians[backend] = float(np.median(times))
        flops = 4 * batch * heads * length * length * dim / 2
        lines.append(f"   {backend:6} first call {first * 1e3:8.1f} ms, median {medians[backend] * 1e3:7.1f}"
                     f" ms, {flops / medians[backend] / 1e9:6.1f} GFLOP/s")
    lines.append(f"   numba is {medians['numpy'] / medians['numba']:.1f}x the NumPy reference")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn demo", description=__doc__)
    parser.add_argument("--plot", metavar="FILE.png", nargs="?", const=PLOT_FILE,
                        help=f"draw the 2-d words and apple's moves (default file: {PLOT_FILE})")
    parser.add_argument("--masks", metavar="FILE.png", nargs="?", const=MASKS_FILE,
                        help="draw which keys each query sees: causal top-left, bottom-right "
                             f"and a sliding window (default file: {MASKS_FILE})")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing section")
    args = parser.parse_args(argv)
    np.set_printoptions(precision=3, suppress=True)
    print(worked_example())
    if not args.no_timing:
        print()
        print(timing())
    if args.plot:
        plot(args.plot)
    if args.masks:
        plot_masks(args.masks)
    return 0
