"""The bad-input catalogue: every misuse raises the right exception naming the argument."""
import numpy as np
import pytest

import fastattn

sdpa = fastattn.scaled_dot_product_attention
f32 = np.float32


def arrays(*shapes, dtype=f32):
    return [np.zeros(s, dtype) for s in shapes]


CASES = [
    # (description, call, exception, words that must appear in the message)
    ("query of rank 1", lambda: sdpa(*arrays((4,), (4, 4), (4, 4))), ValueError, ["query", "(4,)"]),
    ("E of query and key differ", lambda: sdpa(*arrays((2, 5, 8), (2, 6, 4), (2, 6, 4))),
     ValueError, ["E=8", "E=4", "key"]),
    ("S of key and value differ", lambda: sdpa(*arrays((2, 5, 8), (2, 6, 8), (2, 7, 8))),
     ValueError, ["S=6", "S=7", "value"]),
    ("leading dims differ", lambda: sdpa(*arrays((2, 3, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8))),
     ValueError, ["leading dims", "(2, 3, 5, 8)", "(2, 4, 6, 8)"]),
    ("ranks differ", lambda: sdpa(*arrays((2, 5, 8), (5, 8), (5, 8))), ValueError, ["dims"]),
    ("Hq not a multiple of Hkv", lambda: sdpa(*arrays((1, 6, 5, 8), (1, 4, 6, 8), (1, 4, 6, 8)),
                                                 enable_gqa=True), ValueError, ["Hq=6", "Hkv=4"]),
    ("fewer kv heads without enable_gqa", lambda: sdpa(*arrays((1, 6, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8))),
     ValueError, ["enable_gqa"]),
    ("mask does not broadcast", lambda: sdpa(*arrays((2, 5, 8), (2, 6, 8), (2, 6, 8)),
                                                attn_mask=np.ones((5, 5), bool)),
     ValueError, ["attn_mask", "(5, 5)", "(2, 5, 6)"]),
    ("mask bigger than the scores", lambda: sdpa(*arrays((5, 8), (6, 8), (6, 8)),
                                                    attn_mask=np.ones((3, 5, 6), bool)),
     ValueError, ["attn_mask", "(3, 5, 6)", "(5, 6)"]),
    ("integer mask", lambda: sdpa(*arrays((5, 8), (6, 8), (6, 8)), attn_mask=np.ones((5, 6), int)),
     TypeError, ["attn_mask", "int64"]),
    ("unknown similarity", lambda: sdpa(*arrays((5, 8), (6, 8), (6, 8)), similarity="l2"),
     ValueError, ["similarity", "'dot'", "'cosine'", "'l2'"]),
    ("unknown backend", lambda: sdpa(*arrays((5, 8), (6, 8), (6, 8)), backend="tpu"),
     ValueError, ["backend", "'numba'", "'tpu'"]),
    ("infinite scale", lambda: sdpa(*arrays((5, 8), (6, 8), (6, 8)), scale=float("inf")),
     ValueError, ["scale", "inf"]),
    ("nan scale", lambda: sdpa(*arrays((5, 8), (6, 8), (6, 8)), scale=float("nan")),
     ValueError, ["scale"]),
    ("string scale", lambda: sdpa(*arrays((5, 8), (6, 8), (6, 8)), scale="big"), TypeError, ["scale"]),
    ("dropout_p of 1", lambda: sdpa(*arrays((5, 8), (6, 8), (6, 8)), dropout_p=1.0),
     ValueError, ["dropout_p", "[0, 1)"]),
    ("negative dropout_p", lambda: sdpa(*arrays((5, 8), (6, 8), (6, 8)), dropout_p=-0.1),
     ValueError, ["dropout_p"]),
    ("dropout not implemented", lambda: sdpa(*arrays((5, 8), (6, 8), (6, 8)), dropout_p=0.1),
     NotImplementedError, ["dropout_p"]),
    ("integer query", lambda: sdpa(np.zeros((5, 8), int), *arrays((6, 8), (6, 8))),
     TypeError, ["query", "int64"]),
    ("bool key", lambda: sdpa(np.zeros((5, 8), f32), np.zeros((6, 8), bool), np.zeros((6, 8), f32)),
     TypeError, ["key", "bool"]),
    ("complex value", lambda: sdpa(*arrays((5, 8), (6, 8)), np.zeros((6, 8), complex)),
     TypeError, ["value", "complex"]),
    ("object query", lambda: sdpa(np.empty((5, 8), object), *arrays((6, 8), (6, 8))),
     TypeError, ["query", "object"]),
    ("mixed float dtypes", lambda: sdpa(np.zeros((5, 8), f32), np.zeros((6, 8)), np.zeros((6, 8))),
     TypeError, ["same dtype", "float32", "float64"]),
    ("is_causal not a bool", lambda: sdpa(*arrays((5, 8), (6, 8), (6, 8)), is_causal="yes"),
     TypeError, ["is_causal"]),
    ("E of zero", lambda: sdpa(*arrays((5, 0), (6, 0), (6, 3))), ValueError, ["E >= 1"]),
    ("weights: unknown similarity",
     lambda: fastattn.attention_weights(*arrays((5, 8), (6, 8)), similarity="euclid"),
     ValueError, ["similarity", "'euclid'"]),
    ("weights: mask does not broadcast",
     lambda: fastattn.attention_weights(*arrays((5, 8), (6, 8)), attn_mask=np.ones((1, 5), bool)),
     ValueError, ["attn_mask"]),
    ("similarity: unknown kind", lambda: fastattn.similarity(*arrays((5, 8), (6, 8)), kind="l1"),
     ValueError, ["kind", "'cosine'", "'l1'"]),
    ("similarity: E differs", lambda: fastattn.similarity(*arrays((5, 8), (6, 4))),
     ValueError, ["E=8", "E=4"]),
    ("similarity: rank 1", lambda: fastattn.similarity(*arrays((8,), (6, 8))), ValueError, ["a", "(8,)"]),
    ("similarity: leading dims", lambda: fastattn.similarity(*arrays((2, 5, 8), (3, 6, 8))),
     ValueError, ["(2, 5, 8)", "(3, 6, 8)"]),
    ("similarity: integer input", lambda: fastattn.similarity(np.zeros((5, 8), int), np.zeros((5, 8), int)),
     TypeError, ["a", "int64"]),
    ("softmax: integer input", lambda: fastattn.softmax(np.arange(5)), TypeError, ["x", "int64"]),
    ("softmax: axis out of range", lambda: fastattn.softmax(np.zeros((2, 3)), axis=2),
     ValueError, ["axis", "(2, 3)"]),
    ("softmax: float axis", lambda: fastattn.softmax(np.zeros((2, 3)), axis=1.0), TypeError, ["axis"]),
    ("softmax: mask does not broadcast", lambda: fastattn.softmax(np.zeros((2, 3)), mask=np.ones(2, bool)),
     ValueError, ["mask", "(2,)", "(2, 3)"]),
    ("softmax: float mask", lambda: fastattn.softmax(np.zeros((2, 3)), mask=np.ones(3)),
     TypeError, ["mask", "float64"]),
    ("softmax: unknown backend", lambda: fastattn.softmax(np.zeros(3), backend="gpu"),
     ValueError, ["backend"]),
]


@pytest.mark.parametrize("call, exc, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_clearly(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_unusable_backend_says_why(monkeypatch):
    from fastattn import _backends
    monkeypatch.setattr(_backends, "cuda_unavailable_reason", lambda: "no CUDA driver or device found")
    with pytest.raises(fastattn.BackendUnavailableError, match="'cuda' is not usable here: no CUDA driver"):
        sdpa(*arrays((5, 8), (6, 8), (6, 8)), backend="cuda")


def test_without_a_gpu_cuda_is_not_listed_and_import_is_quick():
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    code = ("import time; t = time.perf_counter(); import fastattn; dt = time.perf_counter() - t; "
            "print(fastattn.backends(), dt)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    backends, seconds = " ".join(out[:-1]), float(out[-1])
    try:
        from numba import cuda
        has_gpu = cuda.is_available() and not os.environ.get("NUMBA_ENABLE_CUDASIM")
    except Exception:
        has_gpu = False
    assert ("cuda" in backends) == has_gpu
    assert seconds < 5.0  # no kernel is compiled at import
