"""Every registered architecture, on a small random-weight model of its real transformers class.

Prompts of 550-800 tokens with block_size 64 and min_budget 128, so the sparse path runs (the
statistics confirm it). gamma = 1, tau = 0 must reproduce SDPA to fp32 rounding. Layers whose sliding
window is active at the prompt's length (Gemma 3's sliding layers in ``hf_tiny``) run dense and record
no statistics; every model has at least one layer on the sparse path.
"""

import copy
import warnings

import pytest
import torch
import transformers
from hf_tiny import (
    ARCHITECTURES,
    EXACT,
    SPARSE,
    UNSUPPORTED_MODEL_TYPE,
    assert_close,
    cache_keyword,
    left_pad,
    random_ids,
    tiny_model,
    window_active,
)

import flexprefill_hf.integration as fp
from flexprefill_hf.config import FlexPrefillConfig


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture(scope="module", params=ARCHITECTURES)
def architecture(request):
    return request.param


@pytest.fixture(scope="module")
def model(architecture):
    return tiny_model(architecture)


@pytest.fixture(scope="module")
def prompt():
    return random_ids(800, seed=1)


@pytest.fixture(scope="module")
def sdpa_logits(model, prompt):
    return _logits(model, prompt)


def _check_routes(model, stats, keys, dense, some_operator=True):
    """Windowed layers recorded nothing (dense fallback); the others ran the operator, dense or not as given."""
    active = window_active(model, keys)
    assert len(stats) == model.config.num_hidden_layers == len(active)
    assert not (some_operator and all(active)), "no layer can take the sparse path in this test"
    for layer, (s, windowed) in enumerate(zip(stats, active)):
        if windowed:
            assert s is None, f"layer {layer}: its sliding window is active but the operator ran"
        else:
            assert s is not None and s.dense == dense, f"layer {layer}: expected dense={dense}, got {s}"


def test_gamma_one_equals_sdpa(model, prompt, sdpa_logits):
    fp.patch_model(model, **EXACT)
    try:
        with fp.record_stats(model):
            logits = _logits(model, prompt)
        stats = fp.last_stats(model)
    finally:
        fp.unpatch_model(model)
    _check_routes(model, stats, prompt.shape[1], dense=False)  # the sparse path ran
    assert_close(logits, sdpa_logits)


def test_gamma_below_one_differs_but_is_finite(model, prompt, sdpa_logits):
    fp.patch_model(model, gamma=0.9, tau=0.1, **SPARSE)
    try:
        with fp.record_stats(model):
            logits = _logits(model, prompt)
        stats = fp.last_stats(model)
    finally:
        fp.unpatch_model(model)
    _check_routes(model, stats, prompt.shape[1], dense=False)
    sparse = [s for s in stats if s is not None]
    assert torch.isfinite(logits).all()
    assert (logits - sdpa_logits).abs().max() > 1e-2
    assert all(float(s.computed_fraction.mean()) < 1.0 for s in sparse)
    assert all(bool(torch.isfinite(s.js_distance).all()) for s in sparse)


def _state(model):
    """Every attribute of every module and config, by identity or value."""
    modules = {name: dict(m.__dict__) for name, m in model.named_modules()}
    config = copy.deepcopy(dict(model.config.__dict__))
    return modules, config


def test_unpatch_restores_exactly_after_patching_twice(model, prompt, sdpa_logits):
    modules_before, config_before = _state(model)
    fp.patch_model(model, gamma=0.9, **SPARSE)
    fp.patch_model(model, **EXACT)  # a second patch replaces the configuration
    assert set(fp.layer_configs(model)) == {FlexPrefillConfig(**EXACT)}
    assert model.config._attn_implementation == "flexprefill"
    with fp.record_stats(model):
        _logits(model, prompt[:, :300])
    for _ in range(2):  # and a second unpatch is a no-op
        fp.unpatch_model(model)
        modules_after, config_after = _state(model)
        assert config_after == config_before
        assert modules_after.keys() == modules_before.keys()
        for name, attributes in modules_before.items():
            assert modules_after[name].keys() == attributes.keys(), name
            for key, value in attributes.items():
                assert modules_after[name][key] is value or modules_after[name][key] == value, (name, key)
        assert fp.last_stats(model) is None
        assert torch.equal(_logits(model, prompt), sdpa_logits)


def test_from_pretrained_with_flexprefill(model, prompt, sdpa_logits, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, attn_implementation="flexprefill").eval()
    assert loaded.config._attn_implementation == "flexprefill"
    # No patch_model: the preset matched from the config (dense threshold 1024 tokens: this prompt runs dense).
    with fp.record_stats(loaded):
        logits = _logits(loaded, prompt)
    _check_routes(loaded, fp.last_stats(loaded), prompt.shape[1], dense=True)
    assert_close(logits, sdpa_logits)

    fp.patch_model(loaded, **EXACT)
    with fp.record_stats(loaded):
        logits = _logits(loaded, prompt)
    _check_routes(loaded, fp.last_stats(loaded), prompt.shape[1], dense=False)
    assert_close(logits, sdpa_logits)
    fp.unpatch_model(loaded)
    assert loaded.config._attn_implementation == "flexprefill"


def _switch(model, implementation):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # transformers 4.5x: the config attribute is the switch
        model.config._attn_implementation = implementation


def test_set_attn_implementation_switching(model, prompt, sdpa_logits, monkeypatch):
    from transformers import AttentionInterface

    calls = []
    function = AttentionInterface._global_mapping["flexprefill"]
    monkeypatch.setitem(
        AttentionInterface._global_mapping, "flexprefill", lambda *a, **k: calls.append(1) or function(*a, **k)
    )
    fp.patch_model(model, **EXACT)
    try:
        for implementation, ours in (("sdpa", False), ("flexprefill", True), ("sdpa", False), ("flexprefill", True)):
            _switch(model, implementation)
            assert model.config._attn_implementation == implementation
            calls.clear()
            logits = _logits(model, prompt)
            assert len(calls) == (model.config.num_hidden_layers if ours else 0), implementation
            assert_close(logits, sdpa_logits)
    finally:
        fp.unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_left_padded_batch_equals_each_sequence_alone(model, gamma):
    # The block grid is end-aligned, so left padding leaves every sequence its own blocks: equal even for gamma < 1.
    fp.patch_model(model, gamma=gamma, tau=0.0 if gamma == 1.0 else 0.1, **SPARSE)
    try:
        sequences = [random_ids(800, seed=2)[0], random_ids(550, seed=3)[0]]
        ids, mask, positions = left_pad(sequences)
        batched = _logits(model, ids, attention_mask=mask, position_ids=positions)
        for row, seq in enumerate(sequences):
            alone = _logits(model, seq[None])
            assert_close(batched[row, ids.shape[1] - len(seq) :], alone[0])
    finally:
        fp.unpatch_model(model)


def test_second_turn_on_kept_cache_equals_fresh_prefill(model, prompt, sdpa_logits):
    from transformers import DynamicCache

    fp.patch_model(model, **EXACT)
    try:
        cache = DynamicCache()
        first = _logits(model, prompt[:, :500], use_cache=True, **{cache_keyword(model): cache})
        second = _logits(model, prompt[:, 500:], use_cache=True, **{cache_keyword(model): cache})
    finally:
        fp.unpatch_model(model)
    assert_close(torch.cat([first, second], dim=1), sdpa_logits)


def test_batched_generate_with_left_padding_equals_alone(model):
    fp.patch_model(model, gamma=0.95, tau=0.1, **SPARSE)
    try:
        prompts = [random_ids(300, seed=4)[0], random_ids(200, seed=5)[0]]
        ids, mask, _ = left_pad(prompts)
        with torch.no_grad():
            batched = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
            for row, prompt in enumerate(prompts):
                alone = model.generate(prompt[None], max_new_tokens=5, do_sample=False, pad_token_id=0)
                assert torch.equal(batched[row, ids.shape[1] :], alone[0, len(prompt) :])
    finally:
        fp.unpatch_model(model)


def test_registry_refuses_chatglm_and_unknown_models():
    from flexprefill_hf.patches import lookup, supported_model_types

    assert set(supported_model_types()) == set(ARCHITECTURES)
    listed = ", ".join(sorted(ARCHITECTURES))
    with pytest.raises(ValueError, match="'chatglm' is not supported by FlexPrefill; supported model types: .*-hf"):
        lookup("chatglm")
    with pytest.raises(ValueError, match=f"'{UNSUPPORTED_MODEL_TYPE}' is not supported by FlexPrefill; .*softcap"):
        lookup(UNSUPPORTED_MODEL_TYPE)
    with pytest.raises(ValueError, match="'gemma3' is not supported by FlexPrefill; .*bidirectionally.*'gemma3_text'"):
        lookup("gemma3")
    for model_type in ("olmo", None):
        with pytest.raises(ValueError, match=f"{model_type!r} is not supported by FlexPrefill; supported model "
                           f"types: {listed}$"):
            lookup(model_type)


def test_every_registered_architecture_is_built_here(architecture):
    from flexprefill_hf.patches import lookup

    # hf_tiny must cover every registered family, or the tests above would miss one.
    model = tiny_model(architecture)
    modules = lookup(model.config.model_type).attention_modules(model)
    assert [m.layer_idx for m in modules] == list(range(model.config.num_hidden_layers))


def test_gemma3_scale_is_query_pre_attn_scalar():
    # transformers passes scaling = query_pre_attn_scalar ** -0.5; hf_tiny makes it differ from head_dim ** -0.5,
    # so test_gamma_one_equals_sdpa (SDPA uses that scaling) fails if the attention function ignores it.
    model = tiny_model("gemma3_text")
    config = model.config
    for layer in model.model.layers:
        assert layer.self_attn.scaling == config.query_pre_attn_scalar**-0.5 != config.head_dim**-0.5


@pytest.mark.skipif(
    "use_bidirectional_attention" not in transformers.Gemma3TextConfig().to_dict(),
    reason="this transformers has no bidirectional Gemma 3",
)
def test_bidirectional_gemma3_is_refused():
    model = tiny_model("gemma3_text", use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="Gemma3Attention \\(layer 0\\) is not causal"):
        fp.patch_model(model)
    assert model.config._attn_implementation == "sdpa"


# (architecture, config changes, windowed layers): config.sliding_window passed as a keyword to every layer
# (Mistral-7B-v0.1, Phi-3-mini-4k), module.sliding_window on every layer (Qwen3-MoE) or on some (Gemma 3's
# sliding layers, Qwen3 past max_window_layers).
WINDOWED = [
    ("mistral", dict(sliding_window=256), [0, 1]),
    ("phi3", dict(sliding_window=256), [0, 1]),
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=256), [0, 1]),
    ("gemma3_text", {}, [0]),
    ("qwen3", dict(use_sliding_window=True, sliding_window=256, max_window_layers=1), [1]),
]


@pytest.mark.parametrize("architecture, changes, windowed", WINDOWED, ids=[w[0] for w in WINDOWED])
def test_sliding_window_layers_dense_when_active_and_warned_once(architecture, changes, windowed):
    model = tiny_model(architecture, **changes)
    assert [i for i, active in enumerate(window_active(model, 257)) if active] == windowed
    short, long = random_ids(250, seed=6), random_ids(600, seed=7)  # 250 keys: inside the window; 600: beyond it
    expected_short, expected_long = _logits(model, short), _logits(model, long)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fp.patch_model(model, **EXACT)
        at_patch = [str(w.message) for w in caught]
        try:
            with fp.record_stats(model):
                assert_close(_logits(model, short), expected_short)
            _check_routes(model, fp.last_stats(model), 250, dense=False)  # no window active: every layer sparse
            assert all(s is not None for s in fp.last_stats(model))
            for _ in range(3):
                with fp.record_stats(model):
                    assert_close(_logits(model, long), expected_long)
                _check_routes(model, fp.last_stats(model), 600, dense=False, some_operator=False)
        finally:
            fp.unpatch_model(model)
    layers = "all layers" if len(windowed) == model.config.num_hidden_layers else f"layers {windowed}"
    assert len(at_patch) == 1 and f"{layers} use a sliding window of 256 tokens" in at_patch[0], at_patch
    # patch_model named the windowed layers; the calls themselves warn nothing (not once per call or layer).
    at_calls = [str(w.message) for w in caught[1:]]
    assert at_calls == [], at_calls
