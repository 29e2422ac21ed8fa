"""Preset files: the packaged ones, matching, per-layer overrides, errors, and patch_model's config argument."""

import textwrap

import pytest
from hf_tiny import tiny_model

import flexprefill_hf.integration as fp
from flexprefill_hf.config import FlexPrefillConfig
from flexprefill_hf.integration.presets import load_preset, match_preset, parse_preset, preset_names

PAPER_GAMMAS = {
    "llama-3.1-8b-instruct": 0.95,
    "glm-4-9b-chat": 0.95,
    "yi-9b-200k": 0.9,
    "qwen2-7b-instruct": 0.9,
    "default": 0.95,
}
# Presets for models the paper did not tune: a default each, not a claim (the files say which setting they follow).
UNTUNED_GAMMAS = {
    "qwen2.5": 0.9,  # Qwen2's
    "llama-3.2": 0.95,  # Llama-3.1's
    "qwen3": 0.95,  # the paper's default, for the types without a paper setting
    "mistral": 0.95,
    "phi3": 0.95,
    "gemma3-text": 0.95,
}


def test_packaged_presets_hold_the_paper_settings_and_untuned_defaults():
    assert set(preset_names()) == set(PAPER_GAMMAS) | set(UNTUNED_GAMMAS)
    for name, gamma in {**PAPER_GAMMAS, **UNTUNED_GAMMAS}.items():
        config = load_preset(name).config
        assert config == FlexPrefillConfig(gamma=gamma, tau=0.1, block_size=128, min_budget=1024), name
    for name in UNTUNED_GAMMAS:
        assert "untuned" in load_preset(name).description, name


@pytest.mark.parametrize(
    "model_type, name_or_path, expected",
    [
        ("llama", "meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
        ("llama", "meta-llama/Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
        ("llama", "01-ai/Yi-9B-200K", "yi-9b-200k"),
        ("qwen2", "Qwen/Qwen2-7B-Instruct", "qwen2-7b-instruct"),
        ("glm", "THUDM/glm-4-9b-chat-hf", "glm-4-9b-chat"),
        ("glm", "/models/glm-4-9b-chat-1m-hf", "glm-4-9b-chat"),
        ("glm4", "THUDM/GLM-4-9B-0414", "glm-4-9b-chat"),  # the glm presets list their types without names
        ("glm4", "THUDM/GLM-4-32B-0414", "glm-4-9b-chat"),
        ("qwen2", "Qwen/Qwen2.5-7B-Instruct", "qwen2.5"),
        ("qwen2", "/models/qwen2.5-72b-instruct", "qwen2.5"),
        ("qwen2", "Qwen/Qwen2-1.5B", "qwen2-7b-instruct"),  # Qwen2 of another size: the family preset
        ("qwen2", "01-ai/Yi-9B-200K", "qwen2-7b-instruct"),  # a name match needs the model type too
        ("llama", "meta-llama/Llama-3.2-1B-Instruct", "llama-3.2"),
        ("llama", "meta-llama/Llama-3.2-3B", "llama-3.2"),
        ("llama", "HuggingFaceTB/SmolLM2-135M-Instruct", "default"),
        ("llama", "Qwen/Qwen2.5-7B-Instruct", "default"),
        ("llama", "Qwen/Qwen2-7B-Instruct", "default"),
        ("qwen3", "Qwen/Qwen3-8B", "qwen3"),
        ("qwen3_moe", "Qwen/Qwen3-30B-A3B-Instruct-2507", "qwen3"),
        ("mistral", "mistralai/Mistral-7B-Instruct-v0.3", "mistral"),
        ("mistral", "meta-llama/Llama-3.1-8B-Instruct", "mistral"),  # a llama name on a mistral model: ignored
        ("phi3", "microsoft/Phi-4-mini-instruct", "phi3"),
        ("gemma3_text", "google/gemma-3-1b-it", "gemma3-text"),
        ("gemma2", "google/gemma-2-9b-it", "default"),
        (None, "", "default"),
    ],
)
def test_match_by_model_type_and_name(model_type, name_or_path, expected):
    assert match_preset(model_type, name_or_path).name == expected


def test_a_name_match_beats_the_family_preset_which_beats_the_default():
    family = parse_preset("match: {model_types: [llama]}\nflexprefill: {gamma: 0.8}\n", source="family.yaml")
    short = parse_preset("match: {model_types: [llama], names: [yi]}\n", source="short.yaml")
    named = parse_preset("match: {model_types: [llama], names: [yi-9b]}\n", source="named.yaml")
    presets = [family, short, named]
    assert match_preset("llama", "01-ai/Yi-9B-200K", presets) is named  # the longest matching name
    assert match_preset("llama", "01-ai/yi-6b", presets) is short
    assert match_preset("llama", "/models/other", presets) is family
    assert match_preset("qwen2", "01-ai/Yi-9B-200K", presets).name == "default"
    with pytest.raises(ValueError, match="all match model_type 'llama' without names"):
        match_preset("llama", "x", [family, parse_preset("match: {model_types: [llama]}\n", source="two.yaml")])


def test_packaged_match_sections_name_supported_types_once():
    from flexprefill_hf.patches import supported_model_types

    presets = [load_preset(name) for name in preset_names()]
    assert not load_preset("default").model_types  # the fallback never matches by itself
    for preset in presets:
        assert set(preset.model_types) <= set(supported_model_types()), preset.name
    family_types = [t for p in presets if not p.names for t in p.model_types]
    assert len(family_types) == len(set(family_types))
    # Every supported type resolves (no ValueError), and each packaged preset is reachable by some checkpoint.
    reached = {match_preset(t, name).name for t in supported_model_types() for p in presets for name in p.names + ("",)}
    assert reached == set(preset_names())


def test_patch_model_picks_the_family_preset_then_the_name():
    model = tiny_model("qwen2")
    model.config._name_or_path = "/checkpoints/some-qwen2"
    fp.patch_model(model)
    assert {c.gamma for c in fp.layer_configs(model)} == {0.9}  # qwen2-7b-instruct.yaml lists qwen2 without names
    model.config._name_or_path = "meta-llama/Llama-3.1-8B-Instruct"  # a llama name on a qwen2 model: ignored
    fp.patch_model(model)
    assert {c.gamma for c in fp.layer_configs(model)} == {0.9}
    fp.unpatch_model(model)
    llama = tiny_model("llama")
    llama.config._name_or_path = "01-ai/Yi-9B-200K"
    fp.patch_model(llama)
    assert {c.gamma for c in fp.layer_configs(llama)} == {0.9}  # yi-9b-200k.yaml by name
    llama.config._name_or_path = "/checkpoints/my-llama"
    fp.patch_model(llama)
    assert {c.gamma for c in fp.layer_configs(llama)} == {0.95}  # default.yaml
    fp.unpatch_model(llama)


def test_patch_model_config_forms(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    fp.patch_model(model, "yi-9b-200k")
    assert {c.gamma for c in fp.layer_configs(model)} == {0.9}
    fp.patch_model(model, FlexPrefillConfig(gamma=0.8, block_size=64), tau=0.2)
    assert set(fp.layer_configs(model)) == {FlexPrefillConfig(gamma=0.8, tau=0.2, block_size=64)}
    path = tmp_path / "mine.yaml"
    path.write_text(
        textwrap.dedent(
            """
            flexprefill: {gamma: 0.9, min_budget: 256}
            layers:
              0: {gamma: 1.0}
              "2-3": {tau: 0.0}
            """
        )
    )
    fp.patch_model(model, path, max_budget=4096)
    got = [(c.gamma, c.tau, c.min_budget, c.max_budget) for c in fp.layer_configs(model)]
    assert got == [(1.0, 0.1, 256, 4096), (0.9, 0.1, 256, 4096), (0.9, 0.0, 256, 4096), (0.9, 0.0, 256, 4096)]
    fp.patch_model(model, str(path))
    assert [c.gamma for c in fp.layer_configs(model)] == [1.0, 0.9, 0.9, 0.9]

    with pytest.raises(TypeError, match="gama"):
        fp.patch_model(model, gama=0.9)
    with pytest.raises(ValueError, match="gamma=1.5"):
        fp.patch_model(model, gamma=1.5)
    with pytest.raises(ValueError, match="unknown preset 'llama-3'"):
        fp.patch_model(model, "llama-3")
    with pytest.raises(TypeError, match="config=\\{'gamma': 0.9\\} has type dict; expected None, a preset name"):
        fp.patch_model(model, {"gamma": 0.9})
    with pytest.raises(TypeError, match="block_size=128.0 has type float; expected an int"):
        fp.patch_model(model, block_size=128.0)
    assert [c.gamma for c in fp.layer_configs(model)] == [1.0, 0.9, 0.9, 0.9]  # rejected patches changed nothing
    fp.unpatch_model(model)


def test_layer_override_beyond_the_model_names_file_and_key(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("layers:\n  '2-40': {gamma: 1.0}\n")
    model = tiny_model("llama", num_hidden_layers=4)
    with pytest.raises(ValueError, match=r"deep\.yaml: layers\.2-40: the model has 4 layers"):
        fp.patch_model(model, path)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "text, key",
    [
        ("flexprefill: {gama: 0.9}\n", "flexprefill.gama"),
        ("flexprefill: {gamma: 2.0}\n", "gamma=2.0"),
        ("flexprefill: {min_budget: 1e3}\n", "min_budget='1e3'"),
        ("flexprefill: {block_size: 96}\n", "block_size=96"),
        # FlexPrefillConfig's TypeError surfaces as the loader's ValueError, with file and key.
        ("flexprefill: {block_size: 128.0}\n", "flexprefill: block_size=128.0 has type float; expected an int"),
        ("layers: {0: {max_budget: 2048.0}}\n", "layers.0: max_budget=2048.0 has type float"),
        ("match: {names: [yi]}\n", "match.names needs match.model_types"),
        ("presets: {}\n", "unknown key presets"),
        ("match: {model_type: llama}\n", "match.model_type"),
        ("match: {names: 3}\n", "match.names"),
        ("layers: {first: {gamma: 1.0}}\n", "layers.first"),
        ("layers: {0: {gamma: 0}}\n", "layers.0"),
        ("layers: {1: {taux: 0}}\n", "layers.1.taux"),
        ("flexprefill: [gamma, 0.9]\n", "flexprefill"),
        ("flexprefill: {gamma: 0.9\n", "malformed YAML"),
        ("- 1\n- 2\n", "the top level"),
    ],
)
def test_preset_errors_name_the_file_and_the_key(tmp_path, text, key):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as raised:
        load_preset(path)
    message = str(raised.value)
    assert str(path) in message and key in message, message


def test_load_preset_rejects_what_is_not_a_name_or_path(tmp_path):
    with pytest.raises(TypeError, match="name_or_path=3 has type int; expected a preset name or a YAML path"):
        load_preset(3)
    with pytest.raises(ValueError, match="does not exist"):
        load_preset(tmp_path / "missing.yaml")


def test_parse_preset_defaults_and_names():
    preset = parse_preset("flexprefill: {gamma: 0.9}\n", source="x/my-model.yml")
    assert preset.name == "my-model"
    assert preset.config == FlexPrefillConfig(gamma=0.9)
    assert preset.layer_configs(2) == (FlexPrefillConfig(gamma=0.9),) * 2
    assert parse_preset("", source="empty.yaml").config == FlexPrefillConfig()
