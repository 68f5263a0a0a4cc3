"""``python -m fastattn bench --transformers``: a Llama-like transformers model end to end on the
CPU, ``attn_implementation="fastattn"`` against ``"sdpa"``, timed in one interleaved run.

The model is built from a config (random weights, nothing downloaded): 4 layers, hidden 1024, 16
query heads, 4 key/value heads (head size 64). Cases: prefill of L tokens (the forward that
fills a fresh cache; logits of the last token only), and 128 greedy decode steps against a cache
already holding a 4096-token context (the cache is cropped back after each timed run), in float32
and bfloat16.
"""
from __future__ import annotations

import os
import time

from . import measure

PREFILL_LENGTHS = (2048, 8192)
DECODE_CONTEXT = 4096
DECODE_STEPS = 128
DTYPES = ("float32", "bfloat16")
IMPLS = ("sdpa", "fastattn")
LLAMA_LIKE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                  max_position_embeddings=16384)
QUICK = dict(lengths=(256, 512), context=512, steps=8)


def _model(config: dict, dtype: str):
    import torch
    import transformers

    import fastattn.integrations.transformers as fastattn_hf

    fastattn_hf.register()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**config), attn_implementation="sdpa",
        dtype=getattr(torch, dtype))
    return model.eval()


def _cache_kw(model) -> str:
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"


def _prefill(model, impl: str, ids):
    import torch
    import transformers

    def call():
        model.set_attn_implementation(impl)
        with torch.inference_mode():
            cache = transformers.DynamicCache(config=model.config)
            return model(ids, use_cache=True, logits_to_keep=1,
                         **{_cache_kw(model): cache}).logits
    return call


def _decode(model, impl: str, context, steps: int):
    import torch
    import transformers

    model.set_attn_implementation(impl)
    with torch.inference_mode():
        cache = transformers.DynamicCache(config=model.config)
        first = model(context, use_cache=True, logits_to_keep=1,
                      **{_cache_kw(model): cache}).logits[:, -1:].argmax(-1)

    def call():
        model.set_attn_implementation(impl)
        token = first
        with torch.inference_mode():
            for _ in range(steps):
                logits = model(token, use_cache=True, **{_cache_kw(model): cache}).logits
                token = logits[:, -1:].argmax(-1)
            cache.crop(-steps)  # back to the context (a negative count drops tokens)
        return token
    return call


def run(config: dict = LLAMA_LIKE, lengths=PREFILL_LENGTHS, context: int = DECODE_CONTEXT,
        steps: int = DECODE_STEPS, dtypes=DTYPES, min_runs: int = 3, min_time: float = 1.0,
        max_time: float = 60.0, on_case=None) -> list[dict]:
    """Median seconds of each case for sdpa and fastattn, and fastattn's speed-up."""
    import torch

    rows = []
    generator = torch.Generator().manual_seed(1)
    for dtype in dtypes:
        model = _model(config, dtype)
        cases = [(f"prefill L={L}", {impl: _prefill(model, impl, torch.randint(
            0, config["vocab_size"], (1, L), generator=generator)) for impl in IMPLS})
            for L in lengths]
        ids = torch.randint(0, config["vocab_size"], (1, context), generator=generator)
        if steps:
            cases.append((f"decode {steps} steps at {context}",
                          {impl: _decode(model, impl, ids, steps) for impl in IMPLS}))
        for label, calls in cases:
            if on_case is not None:
                on_case(f"{dtype} {label}")
            timing = measure.time_interleaved(calls, min_runs, min_time, max_runs=50,
                                              max_time=max_time)
            row = {"dtype": dtype, "case": label}
            for impl in IMPLS:
                row[impl] = timing[impl]
            if all("median_s" in timing[i] for i in IMPLS):
                row["speedup"] = timing["sdpa"]["median_s"] / timing["fastattn"]["median_s"]
            rows.append(row)
        del model
    return rows


def render(rows: list[dict]) -> str:
    lines = [f"{'dtype':9} {'case':28} {'sdpa ms':>10} {'fastattn ms':>12} {'x sdpa':>7}"]
    for r in rows:
        cells = [r[i].get("median_s", float("nan")) * 1e3 if "median_s" in r[i] else None
                 for i in IMPLS]
        text = ["-" if c is None else f"{c:.1f}" for c in cells]
        speedup = f"{r['speedup']:.2f}" if "speedup" in r else "-"
        lines.append(f"{r['dtype']:9} {r['case']:28} {text[0]:>10} {text[1]:>12} {speedup:>7}")
        for i in IMPLS:
            if "skipped" in r[i]:
                lines.append(f"    {i}: {r[i]['skipped']}")
    return "\n".join(lines)


def main(args) -> int:
    """Run the case with the bench CLI's options (--quick, --threads, --json, --note)."""
    import importlib.util
    import json
    import sys

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"the transformers case needs {' and '.join(missing)}: pip install 'fastattn[hf]'",
              file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch  # noqa: F401  (before the threads are set, so they apply to it)
    sizes = QUICK if args.quick else dict(lengths=PREFILL_LENGTHS, context=DECODE_CONTEXT,
                                          steps=DECODE_STEPS)
    started = time.perf_counter()
    with measure.threads_limited(args.threads):
        header = measure.system_header(args.threads)
        busy = measure.busy_warning()
        rows = run(LLAMA_LIKE, **sizes, min_runs=args.min_runs, min_time=args.min_time,
                   max_time=args.max_time,
                   on_case=None if args.no_progress else
                   (lambda what: print(f"  timing {what}", file=sys.stderr, flush=True)))
    import transformers
    print("fastattn bench --transformers: a Llama-like model (4 layers, hidden 1024, 16 heads, "
          "4 key/value heads)\nend to end on the CPU, attn_implementation='fastattn' against "
          "'sdpa', interleaved in one run")
    for key, value in header.items():
        print(f"  {key}: {value}")
    print(f"  torch {torch.__version__}, transformers {transformers.__version__}")
    if busy:
        print(f"  warning: {busy}")
    if args.note:
        print(f"  note: {args.note}")
    print(f"  this run took {time.perf_counter() - started:.0f} s\n")
    print(render(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "transformers": rows}, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return 0
