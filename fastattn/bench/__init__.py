"""The benchmark tool behind ``python -m fastattn bench``.

- ``cli``: the command line (cases, options, the run, its output);
- ``impls``: the implementations timed (fastattn's backends, NumPy, PyTorch) and their inputs;
- ``measure``: timing taken in turns, the matrix-product peak, memory, JIT cost, the header;
- ``report``: ratios, fitted growth, text, Markdown, JSON and the plot.
"""
from .cli import main

__all__ = ["main"]
