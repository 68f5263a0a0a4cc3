"""The attention variants (alignment, window, softcap, ALiBi): the reference's semantics checked
by hand on small cases, every CPU backend against the reference under the accuracy rule, PyTorch
where it is installed, and bad input.

The numba kernel's key block is 512 keys (``fastattn._numba.BLOCK_K``): the lengths here are not
block multiples, and the windows include one narrower than a block and one spanning several.
"""
import numba
import numpy as np
import pytest

import fastattn
from conftest import assert_matches_reference
from fastattn import reference
from fastattn.kernels.cpu._jit import tanh

sdpa = fastattn.scaled_dot_product_attention
ref_sdpa = reference.scaled_dot_product_attention


def _ref_with_lse(q, k, v, mask=None, **kw):
    return ref_sdpa(q, k, v, mask, return_lse=True, **kw)


def _inputs(rng, shape_q, S, *, kv_heads=None, Ev=None, dtype=np.float32, q_scale=1.0):
    *lead, L, E = shape_q
    lead_kv = list(lead)
    if kv_heads is not None:
        lead_kv[-1] = kv_heads
    q = (rng.standard_normal(shape_q) * q_scale).astype(dtype)
    k = rng.standard_normal((*lead_kv, S, E)).astype(dtype)
    v = rng.standard_normal((*lead_kv, S, E if Ev is None else Ev)).astype(dtype)
    return q, k, v


def _check(backend, q, k, v, mask=None, **kw):
    got = sdpa(q, k, v, mask, return_lse=True, backend=backend, **kw)
    assert got[0].dtype == q.dtype and got[1].shape == q.shape[:-1]
    assert_matches_reference(got, _ref_with_lse, q, k, v, mask, **kw)
    return got


# --- the reference's semantics, by hand ---------------------------------------------------------

def test_keys_seen_by_hand():
    T, F = True, False
    np.testing.assert_array_equal(reference.keys_seen(3, 5, is_causal=True), [
        [T, F, F, F, F], [T, T, F, F, F], [T, T, T, F, F]])
    np.testing.assert_array_equal(reference.keys_seen(3, 5, True, "bottom_right"), [
        [T, T, T, F, F], [T, T, T, T, F], [T, T, T, T, T]])
    # L > S bottom-right: the first L - S rows sit before the first key and see nothing
    np.testing.assert_array_equal(reference.keys_seen(5, 3, True, "bottom_right"), [
        [F, F, F], [F, F, F], [T, F, F], [T, T, F], [T, T, T]])
    np.testing.assert_array_equal(reference.keys_seen(4, 4, window=(1, 0)), [
        [T, F, F, F], [T, T, F, F], [F, T, T, F], [F, F, T, T]])
    np.testing.assert_array_equal(reference.keys_seen(3, 4, window=(None, 1), alignment="bottom_right"), [
        [T, T, T, F], [T, T, T, T], [T, T, T, T]])
    np.testing.assert_array_equal(reference.keys_seen(3, 4, window=(0, None)), [
        [T, T, T, T], [F, T, T, T], [F, F, T, T]])
    # window (0, 0) is the diagonal; causal caps the right side at 0
    np.testing.assert_array_equal(reference.keys_seen(6, 6, window=(0, 0)), np.eye(6, dtype=bool))
    np.testing.assert_array_equal(reference.keys_seen(6, 6, True, window=(2, 3)),
                                  reference.keys_seen(6, 6, window=(2, 0)))
    # L == S: both alignments are the same
    for window in (None, (2, 1), (0, None)):
        for causal in (False, True):
            np.testing.assert_array_equal(
                reference.keys_seen(7, 7, causal, "top_left", window),
                reference.keys_seen(7, 7, causal, "bottom_right", window))
    np.testing.assert_array_equal(reference.positions(3, 5, "bottom_right"), [2, 3, 4])


def test_alibi_distance_by_hand():
    np.testing.assert_array_equal(reference.alibi_bias(np.array([0.5]), 2, 3),
                                  [[[0, -0.5, -1], [-0.5, 0, -0.5]]])
    np.testing.assert_array_equal(reference.alibi_bias(np.array([0.5, 2.0]), 2, 3, "bottom_right"),
                                  [[[-0.5, 0, -0.5], [-1, -0.5, 0]],
                                   [[-2, 0, -2], [-4, -2, 0]]])


def test_reference_variants_by_hand():
    # Two keys, scores known: the weights follow the formulas directly.
    q = np.array([[1.0, 0.0]])
    k = np.array([[4.0, 0.0], [1.0, 0.0]])
    v = np.array([[1.0, 0.0], [0.0, 1.0]])
    out, lse = ref_sdpa(q, k, v, scale=1.0, softcap=2.0, return_lse=True)
    s = 2 * np.tanh(np.array([4.0, 1.0]) / 2)
    np.testing.assert_allclose(out[0], np.exp(s) / np.exp(s).sum(), rtol=1e-14)
    np.testing.assert_allclose(lse[0], np.log(np.exp(s).sum()), rtol=1e-14)
    q3, k3, v3 = q[None], k[None], v[None]  # one head for the slopes
    out = ref_sdpa(q3, k3, v3, scale=1.0, alibi_slopes=np.array([3.0]))
    s = np.array([4.0, 1.0 - 3.0])  # query 0 sits on key 0: key 1 is 1 away
    np.testing.assert_allclose(out[0, 0], np.exp(s) / np.exp(s).sum(), rtol=1e-14)
    # a row that sees no key gives zeros and lse -inf
    out, lse = ref_sdpa(np.ones((3, 2)), k, v, is_causal=True, alignment="bottom_right",
                        return_lse=True)
    np.testing.assert_array_equal(out[0], 0)
    assert lse[0] == -np.inf and np.isfinite(lse[1:]).all()


# --- every backend against the reference ------------------------------------------------------

SHAPES = [(530, 1030), (700, 700), (1030, 530)]  # L < S, L = S, L > S (multi-block)


@pytest.mark.parametrize("L, S", SHAPES)
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("causal", [False, True])
def test_alignment_with_causal(backend, rng, L, S, alignment, causal):
    q, k, v = _inputs(rng, (1, 2, L, 16), S)
    out, lse = _check(backend, q, k, v, is_causal=causal, alignment=alignment)
    if causal and alignment == "bottom_right" and L > S:
        np.testing.assert_array_equal(out[..., :L - S, :], 0)
        assert np.all(lse[..., :L - S] == -np.inf) and np.isfinite(lse[..., L - S:]).all()


WINDOWS = [(0, 0), (5, 0), (100, 0), (37, 11), (600, 70), (None, 9), (9, None), (2000, 2000),
           (1100, 0)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L, S, alignment", [(530, 1030, "bottom_right"), (700, 700, "top_left"),
                                             (1030, 530, "bottom_right"),
                                             (530, 1030, "top_left")])
def test_windows(backend, rng, window, causal, L, S, alignment):
    q, k, v = _inputs(rng, (1, 2, L, 16), S)
    _check(backend, q, k, v, is_causal=causal, window=window, alignment=alignment)


@pytest.mark.parametrize("softcap", [30.0, 50.0])
@pytest.mark.parametrize("causal, alignment", [(False, "top_left"), (True, "top_left"),
                                               (True, "bottom_right")])
def test_softcap_with_large_logits(backend, rng, softcap, causal, alignment):
    q, k, v = _inputs(rng, (2, 2, 520, 32), 610, q_scale=10.0)
    _check(backend, q, k, v, is_causal=causal, alignment=alignment, softcap=softcap)


@pytest.mark.parametrize("slopes_shape", [(4,), (2, 4)])
@pytest.mark.parametrize("causal, alignment, L, S", [(True, "top_left", 600, 600),
                                                     (True, "bottom_right", 520, 1030),
                                                     (False, "bottom_right", 1030, 520)])
def test_alibi(backend, rng, slopes_shape, causal, alignment, L, S):
    q, k, v = _inputs(rng, (2, 4, L, 16), S)
    slopes = (2.0 ** -np.arange(1, 1 + np.prod(slopes_shape))).reshape(slopes_shape)
    _check(backend, q, k, v, is_causal=causal, alignment=alignment, alibi_slopes=slopes)


# Each variant with a bool mask, a float mask and GQA.
VARIANTS = [
    dict(is_causal=True, alignment="bottom_right"),
    dict(is_causal=True, window=(100, 0)),
    dict(window=(37, 600), alignment="bottom_right"),
    dict(window=(None, 3)),
    dict(softcap=30.0, is_causal=True),
    dict(alibi_slopes=np.array([0.25, 0.0625, 0.5, 1.0]), is_causal=True,
         alignment="bottom_right"),
    dict(softcap=50.0, window=(200, 0), is_causal=True,
         alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]), alignment="bottom_right"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(sorted(v)))
@pytest.mark.parametrize("extra", ["bool_mask", "float_mask", "gqa"])
def test_variants_with_masks_and_gqa(backend, rng, variant, extra):
    L, S = 515, 1043
    q, k, v = _inputs(rng, (1, 4, L, 16), S, kv_heads=2 if extra == "gqa" else None,
                      q_scale=5.0 if "softcap" in variant else 1.0)
    mask = None
    if extra == "bool_mask":
        mask = rng.random((4, L, S)) > 0.3
        mask[:, 7] = False  # a row with nothing left
    elif extra == "float_mask":
        mask = rng.standard_normal((L, S)).astype(np.float32)
        mask[:, :50] = -np.inf
    out, lse = _check(backend, q, k, v, mask, enable_gqa=extra == "gqa", **variant)
    if extra == "bool_mask":
        np.testing.assert_array_equal(out[:, :, 7], 0)
        assert np.all(lse[:, :, 7] == -np.inf)


def test_float64_float16_cosine_and_value_width(backend, rng):
    kw = dict(is_causal=True, window=(70, 0), alignment="bottom_right", softcap=20.0,
              alibi_slopes=np.array([0.5, 0.125]))
    q, k, v = _inputs(rng, (1, 2, 300, 16), 560, Ev=24, dtype=np.float64)
    _check(backend, q, k, v, **kw)
    _check(backend, q, k, v, similarity="cosine", scale=8.0, **kw)
    q16, k16, v16 = (a.astype(np.float16) for a in (q, k, v))
    out = sdpa(q16, k16, v16, backend=backend, **kw)
    expected = ref_sdpa(*(a.astype(np.float64) for a in (q16, k16, v16)), **kw)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out, expected, atol=2e-3)


@pytest.mark.parametrize("kw", [dict(is_causal=True, window=(40, 0), alignment="bottom_right"),
                                dict(softcap=10.0, window=(3, 5), alibi_slopes=np.array([0.5, 1.0])),
                                dict(is_causal=True, alignment="bottom_right")])
def test_attention_weights_with_variants(backend, rng, kw):
    q, k, _ = _inputs(rng, (2, 2, 90, 16), 70, q_scale=3.0)
    mask = rng.random((90, 70)) > 0.2
    got = fastattn.attention_weights(q, k, mask, backend=backend, **kw)
    assert_matches_reference(got, reference.attention_weights, q, k, mask, **kw)


def test_multi_head_attention_with_a_window(backend, rng):
    B, L, E, H = 2, 530, 32, 4
    x = rng.standard_normal((B, L, E)).astype(np.float32)
    wq, wk, wv, wo = (rng.standard_normal((E, E)).astype(np.float32) / 4 for _ in range(4))
    wk, wv = wk[:16], wv[:16]  # two key/value heads of 8
    kw = dict(is_causal=True, window=(63, 0), num_kv_heads=2)
    got, _ = fastattn.multi_head_attention(x, x, x, H, wq, wk, wv, wo, backend=backend, **kw)
    assert_matches_reference(
        got, lambda *a, **k: reference.multi_head_attention(*a[:3], H, *a[3:], **k)[0],
        x, x, x, wq, wk, wv, wo, **kw)
    layer = fastattn.MultiHeadAttention(E, H, num_kv_heads=2, seed=0)
    out, _ = layer(x, x, x, is_causal=True, window=(63, 0), backend=backend)
    full, _ = layer(x, x, x, is_causal=True, backend=backend)
    # the first 64 rows see the same keys either way; later rows do not
    np.testing.assert_allclose(out[:, :64], full[:, :64], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[:, 100:], full[:, 100:], atol=1e-3)


def test_window_wider_than_the_keys_is_no_window(backend, rng):
    q, k, v = _inputs(rng, (1, 2, 300, 16), 300)
    np.testing.assert_allclose(sdpa(q, k, v, window=(300, 299), backend=backend),
                               sdpa(q, k, v, backend=backend), rtol=1e-6, atol=1e-7)


# --- the numba kernel itself -------------------------------------------------------------------

needs_numba = pytest.mark.skipif("numba" not in fastattn.backends(), reason="numba not installed")


@needs_numba
def test_one_and_two_threads_give_identical_bits_with_a_window(rng):
    q, k, v = _inputs(rng, (2, 3, 700, 32), 900)
    kw = dict(is_causal=True, window=(300, 0), alignment="bottom_right", softcap=30.0,
              alibi_slopes=np.array([0.5, 0.25, 0.125]), return_lse=True, backend="numba")
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            results.append(sdpa(q, k, v, **kw) + (fastattn.attention_weights(
                q[:, :, :100], k, is_causal=True, window=(30, 0), backend="numba"),))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@numba.njit
def _tanh_all(x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = tanh(x[i])
    return out


@needs_numba
def test_float32_tanh_is_within_a_few_ulp():
    x = np.linspace(-12.0, 12.0, 2_000_001, dtype=np.float32)
    x = np.concatenate([x, np.float32(10.0) ** np.linspace(-30, 0, 10001, dtype=np.float32)])
    x = np.concatenate([x, -x])
    got = _tanh_all(x).astype(np.float64)
    exact = np.tanh(x.astype(np.float64))
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    err = np.abs(got - exact) / ulp
    # measured: 3.09 ulp at most (near x = 0.12), 1.83 where |x| >= 0.75, 0.44 on average;
    # NumPy's float32 tanh 1.4 at most
    assert np.max(err) <= 3.5
    assert np.max(err[np.abs(x) >= 0.75]) <= 2
    assert np.mean(err) <= 0.5
    # odd, and bounded by 1 in magnitude
    np.testing.assert_array_equal(_tanh_all(-x), -_tanh_all(x))
    assert np.all(np.abs(got) <= 1)


@needs_numba
def test_float32_tanh_special_values():
    x = np.array([np.inf, -np.inf, 50.0, -50.0, 1e30, 0.0, -0.0, np.nan], np.float32)
    got = _tanh_all(x)
    np.testing.assert_array_equal(got[:5], [1, -1, 1, -1, 1])
    assert got[5] == 0 and got[6] == 0  # (the kernels' fast-math ignores the sign of zero)
    assert np.isnan(got[7])
    x64 = np.linspace(-20, 20, 1001)
    np.testing.assert_allclose(_tanh_all(x64), np.tanh(x64), rtol=4e-16, atol=0)


# --- PyTorch ------------------------------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("L, S", [(300, 600), (600, 600), (37, 530)])
def test_bottom_right_causal_is_torchs_causal_lower_right(backend, rng, L, S):
    torch = _torch()
    from torch.nn.attention.bias import causal_lower_right
    q, k, v = _inputs(rng, (1, 2, L, 16), S)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=causal_lower_right(L, S)).numpy()
    got = sdpa(q, k, v, is_causal=True, alignment="bottom_right", backend=backend)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("kw", [
    dict(window=(100, 0), is_causal=True),
    dict(window=(20, 30), alignment="bottom_right"),
    dict(alibi_slopes=np.array([0.5, 0.125]), is_causal=True, alignment="bottom_right"),
    dict(alibi_slopes=np.array([[0.5, 0.125]]), window=(None, 5)),
])
def test_windows_and_alibi_are_torch_sdpa_with_the_explicit_pattern(backend, rng, kw):
    torch = _torch()
    L, S = 300, 620
    q, k, v = _inputs(rng, (1, 2, L, 16), S)
    alignment = kw.get("alignment", "top_left")
    keep = reference.keys_seen(L, S, kw.get("is_causal", False), alignment, kw.get("window"))
    bias = np.where(keep, 0.0, -np.inf).astype(np.float32)
    if "alibi_slopes" in kw:
        bias = bias + reference.alibi_bias(np.broadcast_to(kw["alibi_slopes"], (1, 2)), L, S,
                                           alignment, np.float32)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=torch.from_numpy(np.ascontiguousarray(bias))).numpy()
    np.testing.assert_allclose(sdpa(q, k, v, backend=backend, **kw), expected, rtol=1e-5,
                               atol=2e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_softcap_is_torch_attention_with_the_same_score_mod(backend, rng):
    torch = _torch()
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = _inputs(rng, (1, 2, 256, 16), 384, q_scale=10.0)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))

    def softcap(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    expected = flex.flex_attention(tq, tk, tv, score_mod=softcap).numpy()
    np.testing.assert_allclose(sdpa(q, k, v, softcap=30.0, backend=backend), expected,
                               rtol=1e-4, atol=1e-5)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, error, words", [
    (dict(window=(-1, 0)), ValueError, "window left side must be >= 0"),
    (dict(window=(0, -3)), ValueError, "window right side must be >= 0"),
    (dict(window=(1.5, 0)), TypeError, "window left side must be an int"),
    (dict(window=(0, True)), TypeError, "window right side must be an int"),
    (dict(window=(1, 2, 3)), TypeError, "window must be a pair"),
    (dict(window=5), TypeError, "window must be a pair"),
    (dict(window="ab"), TypeError, "window must be a pair"),
    (dict(alignment="bottom"), ValueError, "alignment must be one of"),
    (dict(alignment=None), ValueError, "alignment must be one of"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite float > 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite float > 0"),
    (dict(softcap=float("nan")), ValueError, "softcap must be a finite float > 0"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a finite float > 0"),
    (dict(softcap=True), TypeError, "softcap must be a float"),
    (dict(softcap="1"), TypeError, "softcap must be a float"),
    (dict(alibi_slopes=np.ones(3)), ValueError, "alibi_slopes of shape (3,) do not broadcast"),
    (dict(alibi_slopes=np.ones((2, 2, 1))), ValueError, "alibi_slopes of shape (2, 2, 1)"),
    (dict(alibi_slopes=np.ones(2, np.int64)), TypeError, "alibi_slopes must be a float array"),
    (dict(alibi_slopes=np.ones(2, np.complex64)), TypeError, "alibi_slopes must be a float"),
    (dict(alibi_slopes=np.array([1.0, np.nan])), ValueError, "alibi_slopes must be finite"),
    (dict(alibi_slopes=np.array([np.inf, 1.0])), ValueError, "alibi_slopes must be finite"),
])
def test_bad_variants_get_clear_errors(backend, rng, kw, error, words):
    q, k, v = _inputs(rng, (1, 2, 8, 4), 8)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        sdpa(q, k, v, backend=backend, **kw)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        fastattn.attention_weights(q, k, backend=backend, **kw)


def test_inputs_are_never_written(backend, rng):
    q, k, v = _inputs(rng, (1, 2, 530, 16), 600, kv_heads=1)
    mask = rng.standard_normal((530, 600)).astype(np.float32)
    slopes = np.array([0.5, 0.25])
    copies = [a.copy() for a in (q, k, v, mask, slopes)]
    kw = dict(is_causal=True, window=(70, 0), alignment="bottom_right", softcap=20.0,
              alibi_slopes=slopes, enable_gqa=True)
    sdpa(q, k, v, mask, backend=backend, return_lse=True, **kw)
    fastattn.attention_weights(q, k, mask, backend=backend, **kw)
    for a, b in zip((q, k, v, mask, slopes), copies):
        np.testing.assert_array_equal(a, b)


# --- the bench CLI and the demo -----------------------------------------------------------------

def test_bench_flags_make_the_variant_problems():
    from fastattn.bench import cli, impls
    args = cli.parse_args(["--lengths", "600", "--causal", "--window", "100", "--softcap", "30",
                           "--alibi", "--alignment", "bottom_right"])
    (group,) = cli.build_groups(args)
    (p,) = group.problems
    assert (p.window, p.softcap, p.alibi, p.alignment) == ((100, 0), 30.0, True, "bottom_right")
    assert "window=(100,0)" in p.label() and "softcap=30" in p.label() and "alibi" in p.label()
    # the pairs a causal window of 101 keys keeps: 1 + 2 + ... + 100 for the first rows, then 101
    assert p.with_(alignment="top_left").keys_seen() == sum(range(1, 101)) + 101 * 500
    assert p.flops() == 4 * 8 * 64 * p.keys_seen()
    assert cli.parse_args(["--window", "none,5"]).window == (None, 5)
    args = cli.parse_args(["--lengths", "1024,2048", "--variants"])
    (group,) = cli.build_groups(args)
    assert [q.length for q in group.problems] == [2048] * 4 + [1024]
    assert all(q.causal for q in group.problems)
    assert group.problems[1].window == (1023, 0) and group.problems[2].softcap == 30.0
    assert group.problems[3].alibi and group.problems[4].alignment == "bottom_right"
    np.testing.assert_allclose(impls.alibi_slopes(8), 2.0 ** -np.arange(1, 9))


def test_bench_variants_times_numba_on_every_case_in_one_interleaved_run():
    from fastattn.bench import cli, report
    args = cli.parse_args(["--lengths", "96", "--heads", "2", "--dim", "16", "--variants",
                           "--impls", "numba"])
    args.min_runs, args.min_time, args.max_time = 2, 0.0, 5.0
    (group,) = cli.build_groups(args)
    assert group.interleave == "numba"
    out = cli._run_group(group, args, cli.Progress(len(group.problems) + 1, enabled=False))
    cases = out["interleaved"]["cases"]
    assert [c["label"] for c in cases] == [p.label() for p in group.problems]
    assert cases[0]["x_first"] == 1.0 and all(c["runs"] >= 2 for c in cases)
    for c in cases:
        assert c["median_ms"] > 0 and c["x_first"] == pytest.approx(
            c["median_ms"] / cases[0]["median_ms"])
    text = report.render_text({"groups": [out]})
    assert "numba, every case in one interleaved run" in text
    assert cases[1]["label"] in text.split("interleaved run")[1]


@pytest.mark.parametrize("argv", [["--window", "-1"], ["--window", "1.5"], ["--window", "1,2,3"],
                                  ["--softcap", "0"], ["--softcap", "nan"],
                                  ["--alignment", "middle"]])
def test_bench_rejects_bad_variant_flags(argv, capsys):
    from fastattn.bench import cli
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("kw", [dict(window=(40, 0)), dict(alibi=True),
                                dict(window=(None, 7), alignment="bottom_right", kv_length=300)])
def test_bench_torch_gets_the_same_pattern_as_an_explicit_mask(kw):
    _torch()
    from fastattn.bench import impls
    p = impls.Problem(heads=2, length=200, dim=16, causal=True, mask="bool", **kw)
    a = impls.make_inputs(p)
    got = impls.prepare("numba" if "numba" in fastattn.backends() else "numpy", p, a)()
    np.testing.assert_allclose(got, impls.prepare("torch", p, a)().numpy(), rtol=1e-5,
                               atol=2e-6)
    with pytest.raises(impls.Unavailable, match="softcap"):
        impls.prepare("torch", p.with_(softcap=30.0), a)


def test_demo_masks_draws_the_patterns(tmp_path):
    pytest.importorskip("matplotlib")
    from fastattn import demo
    path = tmp_path / "masks.png"
    assert demo.main(["--no-timing", "--masks", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
