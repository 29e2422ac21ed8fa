"""Routing inside the attention function, the mask function, statistics recording, per-layer configuration,
and how an unsupported architecture loaded with attn_implementation="flexprefill" fails. The bad-input table
of every Hugging Face entry is in test_bad_input.py."""

import inspect
import re
import warnings

import pytest
import torch
from hf_tiny import (
    EXACT,
    SPARSE,
    assert_close,
    cache_keyword,
    left_pad,
    random_ids,
    tiny_model,
    tiny_unsupported_model,
)
from transformers.masking_utils import sdpa_mask

import flexprefill_hf.integration as fp
from flexprefill_hf.config import FlexPrefillConfig
from flexprefill_hf.integration import layer_config as layer_config_module
from flexprefill_hf.integration import routing
from flexprefill_hf.integration.masks import flexprefill_mask
from flexprefill_hf.integration.stats import RECORDER_ATTRIBUTE

# hf_tiny's unsupported model is a Gemma 2 (attention softcapping); the list of supported types follows.
UNSUPPORTED = re.escape("model_type 'gemma2' is not supported by FlexPrefill; supported model types: ") + ".*llama"


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture(scope="module")
def _llama_once():
    return tiny_model("llama")


@pytest.fixture()
def llama(_llama_once):
    """The module's tiny Llama (built once), unpatched again after each test: unpatch_model restores exactly."""
    yield _llama_once
    fp.unpatch_model(_llama_once)
    assert _llama_once.config._attn_implementation == "sdpa"


@pytest.fixture()
def fresh_warnings():
    """Forget which reasons were already warned about, and catch every warning."""
    routing._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    routing._warn_once.cache_clear()


def _flexprefill_warnings(caught):
    return [str(w.message) for w in caught if str(w.message).startswith("FlexPrefill:")]


@pytest.fixture()
def mask_spy(monkeypatch):
    """Record what the registered mask function returns during a forward."""
    from transformers.masking_utils import AttentionMaskInterface

    returned = []

    def spy(*args, **kwargs):
        mask = flexprefill_mask(*args, **kwargs)
        returned.append(mask)
        return mask

    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "flexprefill", spy)
    return returned


def test_mask_function_never_builds_a_query_by_key_mask(llama, mask_spy):
    from transformers import DynamicCache

    fp.patch_model(llama, **EXACT)
    prompt = random_ids(600, seed=1)
    _logits(llama, prompt, attention_mask=torch.ones_like(prompt))
    assert mask_spy == [None]

    ids, mask, positions = left_pad([random_ids(600, seed=2)[0], random_ids(400, seed=3)[0]])
    _logits(llama, ids, attention_mask=mask, position_ids=positions)
    assert mask_spy[1].shape == (2, 600) and torch.equal(mask_spy[1], mask.bool())

    mask_spy.clear()
    with torch.no_grad():
        llama.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert [tuple(m.shape) for m in mask_spy] == [(2, 600), (2, 601), (2, 602)]

    mask_spy.clear()
    cache = DynamicCache()
    _logits(llama, prompt[:, :400], use_cache=True, **{cache_keyword(llama): cache})
    _logits(llama, prompt[:, 400:], use_cache=True, **{cache_keyword(llama): cache})
    assert mask_spy == [None, None]


def test_right_padding_raises(llama):
    fp.patch_model(llama, **EXACT)
    ids = random_ids(300, seed=1, batch=2)
    mask = torch.ones_like(ids)
    mask[1, 250:] = 0
    with pytest.raises(ValueError, match="left padding only.*sequences \\[1\\]"):
        _logits(llama, ids, attention_mask=mask)


def test_mask_function_delegates_what_it_cannot_express():
    from transformers.masking_utils import causal_mask_function

    def bidirectional(batch_idx, head_idx, q_idx, kv_idx):
        return (q_idx >= 0) & (kv_idx >= 0)

    padding = torch.ones(1, 8, dtype=torch.bool)
    if "cache_position" in inspect.signature(sdpa_mask).parameters:  # transformers 4.5x
        sizes = dict(cache_position=torch.arange(8), kv_length=8, kv_offset=0)
    else:
        sizes = dict(q_length=8, kv_length=8, q_offset=0, kv_offset=0)
    common = dict(batch_size=1, dtype=torch.float32, device="cpu", attention_mask=padding, **sizes)
    assert flexprefill_mask(mask_function=causal_mask_function, **common) is None
    # A non-causal mask function, and a preallocated (static) cache whose keys run past the queries.
    full = flexprefill_mask(mask_function=bidirectional, **common)
    assert full.shape == (1, 1, 8, 8) and bool(full.all())
    static = flexprefill_mask(mask_function=causal_mask_function, **{**common, "kv_length": 16})
    assert static.shape == (1, 1, 8, 16)


def test_output_attentions_runs_dense_with_weights_and_warns_once(llama, fresh_warnings):
    prompt = random_ids(300, seed=1)
    llama.config._attn_implementation = "eager"
    eager = llama(prompt, output_attentions=True)
    llama.config._attn_implementation = "sdpa"
    fp.patch_model(llama, **EXACT)
    with torch.no_grad():
        for _ in range(2):
            out = llama(prompt, output_attentions=True)
    assert len(_flexprefill_warnings(fresh_warnings)) == 1
    assert "output_attentions" in _flexprefill_warnings(fresh_warnings)[0]
    for ours, theirs in zip(out.attentions, eager.attentions):
        assert_close(ours, theirs.detach())
    assert_close(out.logits, eager.logits.detach())


def test_custom_4d_mask_runs_dense(llama, fresh_warnings):
    prompt = random_ids(300, seed=1)
    # A causal mask that also hides the first 10 tokens from every query after position 20.
    allowed = torch.ones(300, 300, dtype=torch.bool).tril()
    allowed[20:, :10] = False
    additive = torch.zeros(1, 1, 300, 300).masked_fill(~allowed, torch.finfo(torch.float32).min)
    expected = _logits(llama, prompt, attention_mask=additive)
    fp.patch_model(llama, **EXACT)
    assert_close(_logits(llama, prompt, attention_mask=additive), expected)
    assert any("4-D attention mask" in m for m in _flexprefill_warnings(fresh_warnings))


def test_dropout_in_training_runs_dense(fresh_warnings):
    model = tiny_model("llama", attention_dropout=0.1).train()
    fp.patch_model(model, **EXACT)
    logits = model(random_ids(300, seed=1)).logits
    assert torch.isfinite(logits).all()
    assert any("dropout" in m for m in _flexprefill_warnings(fresh_warnings))


def test_qwen2_sliding_window_layers_run_dense_when_active(fresh_warnings):
    # Layer 0 full attention, layer 1 a 256-token sliding window.
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=256, max_window_layers=1)
    long_prompt, short_prompt = random_ids(600, seed=1), random_ids(200, seed=2)
    expected_long, expected_short = _logits(model, long_prompt), _logits(model, short_prompt)
    with pytest.warns(UserWarning, match="layers \\[1\\] use a sliding window of 256"):
        fp.patch_model(model, **EXACT)

    with fp.record_stats(model):
        assert_close(_logits(model, short_prompt), expected_short)
    assert all(s is not None for s in fp.last_stats(model))
    assert not _flexprefill_warnings(fresh_warnings)

    with fp.record_stats(model):
        assert_close(_logits(model, long_prompt), expected_long)
    stats = fp.last_stats(model)
    assert stats[0] is not None and not stats[0].dense and stats[1] is None
    # patch_model named the windowed layer; the calls that run it dense warn nothing more.
    assert not _flexprefill_warnings(fresh_warnings)

    # Left padding through the dense fallback too.
    ids, mask, positions = left_pad([long_prompt[0], random_ids(450, seed=3)[0]])
    fp.unpatch_model(model)
    expected = _logits(model, ids, attention_mask=mask, position_ids=positions)
    fp.patch_model(model, **EXACT)
    got = _logits(model, ids, attention_mask=mask, position_ids=positions)
    assert_close(got[mask.bool()], expected[mask.bool()])


def test_stats_off_by_default_and_decode_not_recorded(llama):
    fp.patch_model(llama, gamma=0.9, **SPARSE)
    prompt = random_ids(300, seed=1)
    _logits(llama, prompt)
    assert fp.last_stats(llama) is None
    assert all(not hasattr(m, RECORDER_ATTRIBUTE) for m in llama.modules())

    with fp.record_stats(llama) as recorder, torch.no_grad():
        llama.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    stats = fp.last_stats(llama)
    assert stats == recorder.stats and len(stats) == 2
    heads = llama.config.num_attention_heads
    for s in stats:
        # The prompt's prefill (sparse), not the last decode step (dense).
        assert not s.dense
        assert s.query_aware.shape == s.js_distance.shape == s.computed_fraction.shape == (1, heads)
        assert s.computed_blocks.dtype == torch.int32
    assert all(not hasattr(m, RECORDER_ATTRIBUTE) for m in llama.modules())


def test_unpatched_model_uses_the_preset_matched_from_its_config():
    model = tiny_model("llama", num_hidden_layers=1)
    model.config._name_or_path = "01-ai/Yi-9B-200K"
    model.config._attn_implementation = "flexprefill"
    assert [c.gamma for c in fp.layer_configs(model)] == [0.9]
    model.config._name_or_path = "/checkpoints/my-llama"
    assert [c.gamma for c in fp.layer_configs(model)] == [0.95]
    # Resolved once per model (type, name, layers), not per layer and call: the same objects come back.
    assert fp.layer_configs(model)[0] is fp.layer_configs(model)[0]
    # And the forward runs (300 tokens, below the preset's dense threshold of 1024: dense).
    with fp.record_stats(model):
        _logits(model, random_ids(300, seed=1))
    assert fp.last_stats(model)[0].dense


def test_set_layer_config(llama):
    fp.patch_model(llama, gamma=0.9, **SPARSE)
    fp.set_layer_config(llama, 1, gamma=1.0, tau=0.0)
    assert [(c.gamma, c.tau) for c in fp.layer_configs(llama)] == [(0.9, 0.1), (1.0, 0.0)]
    fp.set_layer_config(llama, 0, FlexPrefillConfig(gamma=0.8, block_size=64))
    assert [c.gamma for c in fp.layer_configs(llama)] == [0.8, 1.0]
    fp.unpatch_model(llama)
    assert not any(hasattr(m, layer_config_module.CONFIG_ATTRIBUTE) for m in llama.modules())


def test_prompts_at_and_one_past_the_dense_threshold_equal_sdpa(llama):
    threshold = FlexPrefillConfig(**EXACT).effective_dense_threshold
    prompts = {length: random_ids(length, seed=length) for length in (threshold, threshold + 1)}
    expected = {length: _logits(llama, ids) for length, ids in prompts.items()}
    fp.patch_model(llama, **EXACT)
    for length, ids in prompts.items():
        with fp.record_stats(llama):
            logits = _logits(llama, ids)
        # At the threshold the operator runs dense; one token past it, the sparse path.
        assert all(s.dense == (length == threshold) for s in fp.last_stats(llama)), length
        assert_close(logits, expected[length])


def test_two_models_patched_with_different_configs_keep_their_own(llama):
    other = tiny_model("llama", seed=1)
    prompt = random_ids(600, seed=1)
    expected, other_expected = _logits(llama, prompt), _logits(other, prompt)
    fp.patch_model(llama, **EXACT)
    fp.patch_model(other, gamma=0.9, tau=0.1, **SPARSE)
    try:
        assert set(fp.layer_configs(llama)) == {FlexPrefillConfig(**EXACT)}
        assert set(fp.layer_configs(other)) == {FlexPrefillConfig(gamma=0.9, tau=0.1, **SPARSE)}
        for _ in range(2):  # interleaved: neither run changes what the other model does
            assert_close(_logits(llama, prompt), expected)
            with fp.record_stats(other):
                other_logits = _logits(other, prompt)
            assert (other_logits - other_expected).abs().max() > 1e-2
            assert all(float(s.computed_fraction.mean()) < 1.0 for s in fp.last_stats(other))
        assert fp.last_stats(llama) is None
    finally:
        fp.unpatch_model(other)


def test_gradients_run_dense_exactly_and_warn_once(fresh_warnings):
    # Train mode without dropout: only the gradients keep this 600-token prompt off the sparse path.
    model, reference = tiny_model("llama").train(), tiny_model("llama").train()
    fp.patch_model(model, **EXACT)
    prompt = random_ids(600, seed=1)
    for _ in range(2):
        with fp.record_stats(model):
            logits = model(prompt).logits
        assert fp.last_stats(model) == [None, None]  # every layer ran the dense fallback
    expected = reference(prompt).logits
    assert_close(logits.detach(), expected.detach())
    logits.logsumexp(-1).mean().backward()
    expected.logsumexp(-1).mean().backward()
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert_close(ours.grad, theirs.grad)
    messages = _flexprefill_warnings(fresh_warnings)
    assert len(messages) == 1 and "does not support gradients" in messages[0] and "torch.no_grad()" in messages[0]
    # Without gradients the same model takes the sparse path.
    with fp.record_stats(model), torch.no_grad():
        model(prompt)
    assert all(s is not None and not s.dense for s in fp.last_stats(model))
    fp.unpatch_model(model)


def test_unsupported_architecture_loaded_with_flexprefill_fails_at_first_forward(tmp_path, monkeypatch):
    from transformers import AttentionInterface, Gemma2ForCausalLM

    calls = []
    monkeypatch.setitem(
        AttentionInterface._global_mapping,
        "flexprefill",
        lambda *args, **kwargs: calls.append(1) or routing.flexprefill_attention_forward(*args, **kwargs),
    )
    tiny_unsupported_model(attention_dropout=0.1).save_pretrained(tmp_path)
    # transformers (4.53, 5.x) checks only that the name is registered: loading succeeds.
    loaded = Gemma2ForCausalLM.from_pretrained(tmp_path, attn_implementation="flexprefill")
    prompt = random_ids(300, seed=1)
    with pytest.raises(ValueError, match=UNSUPPORTED):
        _logits(loaded.eval(), prompt)
    with pytest.raises(ValueError, match=UNSUPPORTED):
        loaded.train()(prompt)  # training with dropout does not run dense silently either
    with pytest.raises(ValueError, match=UNSUPPORTED), torch.no_grad():
        loaded.eval().generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert calls == []  # the mask function refused before any layer ran


def test_unsupported_attention_module_called_directly_raises():
    attention = tiny_unsupported_model().model.layers[0].self_attn
    query = torch.randn(1, 4, 300, 16)
    key = value = torch.randn(1, 2, 300, 16)
    with pytest.raises(ValueError, match=UNSUPPORTED):
        routing.flexprefill_attention_forward(attention, query, key, value, None)
    with pytest.raises(ValueError, match=UNSUPPORTED):  # also when the call would run dense
        routing.flexprefill_attention_forward(attention, query, key, value, None, dropout=0.5)


def test_rejected_calls_change_nothing(llama):
    fp.patch_model(llama, gamma=0.9, **SPARSE)
    before = fp.layer_configs(llama)
    for bad in (dict(layer_idx=2, gamma=1.0), dict(layer_idx=0, gamma=1.5), dict(layer_idx=0, block_size=96)):
        with pytest.raises(ValueError):
            fp.set_layer_config(llama, **bad)
    with pytest.raises(ValueError):
        fp.patch_model(llama, gamma=1.5)
    assert fp.layer_configs(llama) == before
