"""attn_implementation="fastattn" in Hugging Face transformers models built from tiny random configs
(nothing downloaded): the same logits as "sdpa" (or "eager" where sdpa has no softcap) within 1e-4
in float32, the same 32 greedy tokens, left padding in a batch of 2, bfloat16 models that run.
"""
import inspect
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fastattn.torch as ft  # noqa: E402
import fastattn.integrations.transformers as fa_hf  # noqa: E402

NAME = fa_hf.register()
VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def llama():
    return transformers.LlamaConfig(**SMALL)


def qwen2():
    return transformers.Qwen2Config(**SMALL)


def mistral():
    return transformers.MistralConfig(**SMALL, sliding_window=8)


def gemma2():
    return transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=8,
                                     attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                                     query_pre_attn_scalar=16)


def gpt2():
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                   n_positions=256)


# (config, fastattn's name for it, the implementation compared with)
DECODERS = {
    "llama": (llama, NAME, "sdpa"),
    "qwen2": (qwen2, NAME, "sdpa"),
    "mistral": (mistral, NAME, "sdpa"),   # sliding window 8 < the 44 tokens
    "gemma2": (gemma2, NAME, "eager"),    # softcap and sliding window; sdpa has no softcap
    "gpt2": (gpt2, NAME, "sdpa"),
}


def build(config_fn, impl, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_fn(), attn_implementation=impl,
                                                          dtype=dtype)
    return model.eval()


def batch(seed=1, L=12, pad=4):
    """Two prompts, the second left-padded by ``pad`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, L), generator=g)
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, :pad] = 0
    return ids, mask, pad


@pytest.fixture
def calls(monkeypatch):
    """What fastattn.torch is called with from inside the models."""
    seen = []
    sdpa = ft.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, **kwargs):
        seen.append(dict(query=query, key=key, value=value, mask=attn_mask, kwargs=kwargs,
                         args=args))
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(ft, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("model_name", DECODERS)
def test_logits_equal_and_greedy_tokens_match_with_left_padding(model_name, calls):
    config_fn, name, other = DECODERS[model_name]
    model = build(config_fn, other)
    ids, mask, pad = batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        want_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=32,
                                     do_sample=False, pad_token_id=0)
        model.set_attn_implementation(name)
        got = model(ids, attention_mask=mask).logits
        assert calls, "fastattn was not called"
        calls.clear()
        got_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=32,
                                    do_sample=False, pad_token_id=0)
    # the padded positions' logits are meaningless (their queries see no key)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1, pad:], want[1, pad:], rtol=0, atol=1e-4)
    assert got_tokens.shape == (2, 12 + 32)
    assert torch.equal(got_tokens, want_tokens)
    decode = [c for c in calls if c["query"].shape[-2] == 1]
    assert decode and all(c["key"].shape[-2] > 1 for c in decode)


def test_gqa_without_repeat_kv_and_the_padding_mask_in_place(calls):
    model = build(llama, NAME)
    ids, mask, pad = batch()
    keep = mask.bool()
    with torch.no_grad():
        model(ids, attention_mask=keep)
    assert len(calls) == 2  # one per layer
    for c in calls:
        assert c["query"].shape[1] == 4 and c["key"].shape[1] == 2  # no repeat_kv
        assert c["kwargs"]["enable_gqa"] is True
        assert c["mask"].shape == (2, 1, 1, 12) and c["mask"].data_ptr() == keep.data_ptr()
        assert c["kwargs"]["is_causal"] is True


def test_no_padding_gives_no_mask(calls):
    model = build(llama, NAME)
    ids, _, _ = batch()
    with torch.no_grad():
        model(ids)
    assert all(c["mask"] is None and c["kwargs"]["is_causal"] for c in calls)


def test_decode_reads_the_models_own_cache(calls):
    model = build(llama, NAME)
    ids, mask, _ = batch()
    cache = transformers.DynamicCache(config=model.config)
    # transformers 5.x renames past_key_values to cache
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True, **{cache_kw: cache})
        calls.clear()
        step = out.logits[:, -1:].argmax(-1)
        model(step, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
              use_cache=True, **{cache_kw: cache})
    assert len(calls) == 2
    for layer, c in zip(cache.layers, calls):
        assert c["query"].shape[-2] == 1 and c["key"].shape[-2] == 13
        assert c["key"].data_ptr() == layer.keys.data_ptr()
        assert c["value"].data_ptr() == layer.values.data_ptr()


def test_sliding_window_is_a_window_not_a_mask(calls):
    model = build(mistral, NAME)
    ids, _, _ = batch(L=20)
    with torch.no_grad():
        model(ids)
    assert calls and all(c["mask"] is None and c["kwargs"]["window"] == (7, 0) for c in calls)


def test_gemma2_softcap_and_window_reach_fastattn(calls):
    model = build(gemma2, NAME)
    ids, _, _ = batch(L=20)
    with torch.no_grad():
        model(ids)
    assert [c["kwargs"].get("window") for c in calls] == [(7, 0), None]  # sliding, then full
    assert all(c["kwargs"]["softcap"] == 5.0 for c in calls)


def test_bert_encoder_with_padding():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128)
    model = transformers.AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa").eval()
    ids, mask, _ = batch()
    mask = mask.flip(1)  # right padding, as encoders are fed
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        model.set_attn_implementation(NAME)
        got = model(ids, attention_mask=mask).logits
        got_no_pad = model(ids).logits
        model.set_attn_implementation("sdpa")
        want_no_pad = model(ids).logits
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1, :8], want[1, :8], rtol=0, atol=1e-4)
    torch.testing.assert_close(got_no_pad, want_no_pad, rtol=0, atol=1e-4)


def test_gpt2_cross_attention():
    config = gpt2()
    config.add_cross_attention = True
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.set_attn_implementation("sdpa")
    ids, mask, pad = batch()
    encoder = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(3))
    encoder_mask = torch.ones(2, 9, dtype=torch.long)
    encoder_mask[1, 6:] = 0
    kw = dict(attention_mask=mask, encoder_hidden_states=encoder,
              encoder_attention_mask=encoder_mask)
    with torch.no_grad():
        want = model(ids, **kw).logits
        model.set_attn_implementation(NAME)
        got = model(ids, **kw).logits
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1, pad:], want[1, pad:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_name", DECODERS)
def test_bfloat16_models_run(model_name, calls):
    config_fn, name, other = DECODERS[model_name]
    model = build(config_fn, other, dtype=torch.bfloat16)
    ids, mask, pad = batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits.float()
        model.set_attn_implementation(name)
        got = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                pad_token_id=0)
    assert got.dtype == torch.bfloat16 and calls[0]["query"].dtype == torch.bfloat16
    assert torch.isfinite(got).all() and tokens.shape == (2, 16)
    # bfloat16 rounding of every layer, not of attention alone: a loose bound
    assert (got.float()[0] - want[0]).abs().max() < 0.1 * want[0].abs().max()


def test_training_gradients_equal_sdpa():
    model = build(llama, "sdpa")
    model.train()
    ids, mask, pad = batch()
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for impl in ("sdpa", NAME):
        model.set_attn_implementation(impl)
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, g in grads["sdpa"].items():
        torch.testing.assert_close(grads[NAME][n], g, rtol=0, atol=1e-4, msg=n)


def test_register_refuses_unknown_options():
    with pytest.raises(TypeError, match="unknown option"):
        fa_hf.register("fastattn_bad", backnd="numpy")


def test_the_bench_case_runs_on_a_tiny_model():
    from fastattn.bench import transformers_case
    tiny = dict(SMALL, num_hidden_layers=1)
    rows = transformers_case.run(tiny, lengths=(16,), context=16, steps=2, dtypes=("float32",),
                                 min_runs=1, min_time=0.0)
    assert [r["case"] for r in rows] == ["prefill L=16", "decode 2 steps at 16"]
    assert all(r["sdpa"]["median_s"] > 0 and r["fastattn"]["median_s"] > 0 for r in rows)
    assert "x sdpa" in transformers_case.render(rows)


def test_packed_sequences_use_transformers_complete_mask(calls):
    # Two sequences packed in one row (position ids restart, no cache): a pattern fastattn's mask
    # interface does not recognise, so transformers' sdpa_mask materialises it.
    model = build(llama, "sdpa")
    ids, _, _ = batch()
    ids = ids[:1]
    positions = torch.cat([torch.arange(6), torch.arange(6)])[None]
    with torch.no_grad():
        want = model(ids, position_ids=positions, use_cache=False).logits
        model.set_attn_implementation(NAME)
        got = model(ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert all(c["mask"].shape == (1, 1, 12, 12) and not c["kwargs"]["is_causal"] for c in calls)
    assert not calls[0]["mask"][0, 0, 6, :6].any()  # the second sequence does not see the first


def test_static_cache_generation(calls):
    model = build(llama, "sdpa")
    ids, mask, _ = batch()
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    with torch.no_grad():
        want = model.generate(ids, **kw)
        model.set_attn_implementation(NAME)
        got = model.generate(ids, **kw)
    assert torch.equal(got, want)
    assert any(c["query"].shape[-2] == 1 for c in calls)



def test_the_source_trees_kernels_never_stand_in_for_an_installed_package():
    """transformers imports Hugging Face's ``kernels`` when it is installed (CI installs it);
    run from the source tree, the tree's own kernels/ must not be what it gets, and the path is
    left as it was."""
    import importlib.metadata
    import sys

    path = list(sys.path)
    fa_hf._installed_kernels_first()
    assert sys.path == path
    try:
        importlib.metadata.distribution("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    transformers.AttentionInterface  # the import that reaches for ``kernels``
    module = sys.modules.get("kernels")
    tree_kernels = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ft.__file__))),
                                "kernels")
    ours = module is not None and os.path.abspath(
        getattr(module, "__file__", "") or "").startswith(tree_kernels + os.sep)
    assert not (installed and ours), module
