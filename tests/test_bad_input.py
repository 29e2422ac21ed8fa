"""Bad input to every public entry: one table, each row the call, the exception and what the user reads.

Every message must name the argument, the value received and what is allowed; the fragments of each row
are checked in the exception's text (for the examples' command lines: in argparse's error on stderr, with
exit status 2). The examples are loaded only for their ``parse_args(argv)``: the command line is their
public entry, and parsing must reject a bad value before any model loads.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_tiny import random_ids, tiny_model, tiny_unsupported_model

import flexprefill_hf
from flexprefill_hf import (
    FlexPrefillConfig,
    flexprefill_attention,
    flexprefill_attention_with_stats,
    last_stats,
    layer_configs,
    load_preset,
    patch_model,
    record_stats,
    set_layer_config,
    unpatch_model,
)
from flexprefill_hf.integration.presets import parse_preset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
UNSUPPORTED = "is not supported by FlexPrefill; supported model types:"


class Env:
    """What a row's call may use: a temporary folder and three small models (built once per module)."""

    def __init__(self, tmp_path: Path, models: dict):
        self.tmp_path = tmp_path
        self.plain = models["plain"]  # llama, unpatched (sdpa)
        self.patched = models["patched"]  # llama, patched with the default preset
        self.unsupported = models["unsupported"]  # gemma2 (softcapping: refused)

    def yaml(self, text: str, name: str = "preset.yaml") -> Path:
        path = self.tmp_path / name
        path.write_text(text)
        return path

    def saved_unsupported(self) -> Path:
        folder = self.tmp_path / "gemma2"
        self.unsupported.save_pretrained(folder)
        return folder


def qkv(batch=1, q_len=256, k_len=256, q_heads=4, kv_heads=2, head_dim=64, dtype=torch.float32):
    """Small valid inputs: q [B, q_len, Hq, D], k, v [B, k_len, Hkv, D] (under the dense threshold)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, q_len, q_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, k_len, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, k_len, kv_heads, head_dim, generator=g).to(dtype)
    return q, k, v


def attention(**changes):
    """flexprefill_attention on qkv() with some arguments replaced (q, k, v, config, key_start, softmax_scale)."""
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v, **changes}
    return flexprefill_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def batch_of_two(**changes):
    """attention()'s arguments for a batch of two sequences, with some replaced."""
    q, k, v = qkv(batch=2)
    return {"q": q, "k": k, "v": v, **changes}


def grad_attention(name: str):
    """The operator with grad mode on and one of q, k, v requiring grad."""
    tensors = dict(zip("qkv", qkv()))
    tensors[name].requires_grad_()
    with torch.enable_grad():
        return flexprefill_attention(tensors["q"], tensors["k"], tensors["v"])


def first_forward(env, train: bool):
    """Load the unsupported (Gemma 2) model with attn_implementation="flexprefill" and run one forward."""
    model = type(env.unsupported).from_pretrained(env.saved_unsupported(), attn_implementation="flexprefill")
    with torch.no_grad():
        model.train(train)(random_ids(300, seed=1))


def enter(context_manager):
    with context_manager:
        pass


def example(name: str):
    """The example script ``examples/<name>.py`` as a module (its folder on sys.path for ``_cli``)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(name: str, *argv: str):
    return lambda env: example(name).parse_args(list(argv))


def row(id, call, exc, *fragments, marks=()):
    return pytest.param(call, exc, fragments, id=id, marks=marks)


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")

CONFIG_ROWS = [
    # Float fields: gamma in (0, 1], tau >= 0.
    row("config-gamma-str", lambda e: FlexPrefillConfig(gamma="0.9"), TypeError, "gamma='0.9'", "has type str", "expected a float"),
    row("config-gamma-bool", lambda e: FlexPrefillConfig(gamma=True), TypeError, "gamma=True", "has type bool", "expected a float"),
    row("config-gamma-zero", lambda e: FlexPrefillConfig(gamma=0.0), ValueError, "gamma=0.0", "expected 0 < gamma <= 1"),
    row("config-gamma-above-one", lambda e: FlexPrefillConfig(gamma=1.5), ValueError, "gamma=1.5", "expected 0 < gamma <= 1"),
    row("config-gamma-inf", lambda e: FlexPrefillConfig(gamma=float("inf")), ValueError, "gamma=inf", "expected 0 < gamma <= 1"),
    row("config-gamma-nan", lambda e: FlexPrefillConfig(gamma=float("nan")), ValueError, "gamma=nan"),
    row("config-tau-negative", lambda e: FlexPrefillConfig(tau=-0.1), ValueError, "tau=-0.1", "expected tau >= 0"),
    row("config-tau-nan", lambda e: FlexPrefillConfig(tau=float("nan")), ValueError, "tau=nan"),
    row("config-tau-none", lambda e: FlexPrefillConfig(tau=None), TypeError, "tau=None", "has type NoneType", "expected a float"),
    # Integer fields: a float (even a whole one) is a TypeError naming the field.
    row("config-block_size-float", lambda e: FlexPrefillConfig(block_size=128.0), TypeError, "block_size=128.0 has type float; expected an int"),
    row("config-block_size-str", lambda e: FlexPrefillConfig(block_size="128"), TypeError, "block_size='128'", "has type str", "expected an int"),
    row("config-block_size-bool", lambda e: FlexPrefillConfig(block_size=True), TypeError, "block_size=True", "has type bool", "expected an int"),
    row("config-block_size-96", lambda e: FlexPrefillConfig(block_size=96), ValueError, "block_size=96", "expected one of (64, 128)"),
    row("config-min_budget-float", lambda e: FlexPrefillConfig(min_budget=1024.0), TypeError, "min_budget=1024.0 has type float; expected an int"),
    row("config-min_budget-negative", lambda e: FlexPrefillConfig(min_budget=-1), ValueError, "min_budget=-1", "expected an int >= 0"),
    row("config-max_budget-float", lambda e: FlexPrefillConfig(max_budget=2048.0), TypeError, "max_budget=2048.0 has type float; expected an int"),
    row("config-max_budget-zero", lambda e: FlexPrefillConfig(max_budget=0, min_budget=0), ValueError, "max_budget=0", "expected an int >= 1"),
    row("config-max_budget-below-min", lambda e: FlexPrefillConfig(max_budget=512), ValueError, "max_budget=512 is smaller than min_budget=1024", "expected max_budget >= min_budget"),
    row("config-max_budget-fraction", lambda e: FlexPrefillConfig(max_budget=1.5), TypeError, "max_budget=1.5 has type float; expected an int"),
    row("config-dense_threshold-float", lambda e: FlexPrefillConfig(dense_threshold=100.5), TypeError, "dense_threshold=100.5 has type float; expected an int"),
    row("config-dense_threshold-negative", lambda e: FlexPrefillConfig(dense_threshold=-1), ValueError, "dense_threshold=-1", "expected an int >= 0"),
    row("config-cuda_dense_below-float", lambda e: FlexPrefillConfig(cuda_dense_below=24576.0), TypeError, "cuda_dense_below=24576.0 has type float; expected an int"),
    row("config-cuda_dense_below-none", lambda e: FlexPrefillConfig(cuda_dense_below=None), TypeError, "cuda_dense_below=None", "expected an int"),
    row("config-cuda_dense_below-negative", lambda e: FlexPrefillConfig(cuda_dense_below=-1), ValueError, "cuda_dense_below=-1", "expected an int >= 0"),
    row("config-unknown-field", lambda e: FlexPrefillConfig(gama=0.9), TypeError, "gama"),
    row("config-replace-unknown", lambda e: FlexPrefillConfig().replace(gama=0.9), TypeError, "unknown FlexPrefillConfig field(s) ['gama']", "expected some of: gamma"),
    row("config-replace-float", lambda e: FlexPrefillConfig().replace(block_size=64.0), TypeError, "block_size=64.0 has type float; expected an int"),
]

PRESET_ROWS = [
    row("yaml-block_size-float", lambda e: parse_preset("flexprefill:\n  block_size: 128.0\n", "x.yaml"), ValueError, "x.yaml", "flexprefill", "block_size=128.0 has type float; expected an int"),
    row("yaml-gamma-out-of-range", lambda e: parse_preset("flexprefill: {gamma: 2}\n", "x.yaml"), ValueError, "x.yaml: flexprefill: gamma=2", "expected 0 < gamma <= 1"),
    row("yaml-gamma-text", lambda e: parse_preset("flexprefill: {gamma: high}\n", "x.yaml"), ValueError, "x.yaml", "gamma='high'", "has type str"),
    row("yaml-unknown-top-key", lambda e: parse_preset("flexprefil: {gamma: 0.9}\n", "x.yaml"), ValueError, "x.yaml: unknown key flexprefil", "expected one of: description, match, flexprefill, layers"),
    row("yaml-unknown-field", lambda e: parse_preset("flexprefill: {gama: 0.9}\n", "x.yaml"), ValueError, "x.yaml: unknown key flexprefill.gama", "expected one of: gamma"),
    row("yaml-unknown-match-key", lambda e: parse_preset("match: {model: llama}\n", "x.yaml"), ValueError, "unknown key match.model", "expected one of: model_types, names"),
    row("yaml-names-without-types", lambda e: parse_preset("match: {names: [yi]}\n", "x.yaml"), ValueError, "match.names needs match.model_types"),
    row("yaml-model_types-number", lambda e: parse_preset("match: {model_types: 3}\n", "x.yaml"), ValueError, "match.model_types", "expected a list of strings", "3"),
    row("yaml-layer-negative", lambda e: parse_preset("layers: {-1: {gamma: 1.0}}\n", "x.yaml"), ValueError, "layers.-1", "expected a layer index >= 0 or an inclusive range"),
    row("yaml-layer-empty-range", lambda e: parse_preset("layers: {'5-2': {gamma: 1.0}}\n", "x.yaml"), ValueError, "layers.5-2", "the range is empty"),
    row("yaml-layer-unknown-field", lambda e: parse_preset("layers: {0: {gama: 1.0}}\n", "x.yaml"), ValueError, "unknown key layers.0.gama"),
    row("yaml-layer-float-field", lambda e: parse_preset("layers: {0: {min_budget: 256.0}}\n", "x.yaml"), ValueError, "layers.0", "min_budget=256.0 has type float; expected an int"),
    row("yaml-malformed", lambda e: parse_preset("flexprefill: [\n", "x.yaml"), ValueError, "x.yaml: malformed YAML"),
    row("yaml-top-level-list", lambda e: parse_preset("- 1\n", "x.yaml"), ValueError, "x.yaml: the top level: expected a mapping"),
    row("yaml-flexprefill-list", lambda e: parse_preset("flexprefill: [0.9]\n", "x.yaml"), ValueError, "x.yaml: flexprefill: expected a mapping", "[0.9]"),
    row("load-file-block_size-float", lambda e: load_preset(e.yaml("flexprefill: {block_size: 128.0}\n")), ValueError, "preset.yaml", "block_size=128.0 has type float; expected an int"),
    row("load-missing-file", lambda e: load_preset(e.tmp_path / "missing.yaml"), ValueError, "missing.yaml", "does not exist"),
    row("load-unknown-name", lambda e: load_preset("no-such-preset"), ValueError, "unknown preset 'no-such-preset'", "expected a YAML path or one of: default"),
    row("load-not-a-name", lambda e: load_preset(3), TypeError, "name_or_path=3", "has type int", "expected a preset name or a YAML path"),
]

OPERATOR_ROWS = [
    row("op-q-list", lambda e: attention(q=[[0.0]]), TypeError, "q has type list", "expected a torch.Tensor"),
    row("op-v-none", lambda e: attention(v=None), TypeError, "v has type NoneType", "expected a torch.Tensor"),
    row("op-q-3-dims", lambda e: attention(q=qkv()[0][0]), ValueError, "q has shape (256, 4, 64)", "expected 4 dims"),
    row("op-k-5-dims", lambda e: attention(k=qkv()[1][None]), ValueError, "k has shape (1, 1, 256, 2, 64)", "expected 4 dims"),
    row("op-int-dtype", lambda e: attention(q=qkv()[0].long()), TypeError, "q has dtype torch.int64", "expected one of"),
    row("op-mixed-dtypes", lambda e: attention(q=qkv()[0].half()), TypeError, "dtypes differ", "torch.float16", "torch.float32", "expected one dtype"),
    row("op-mixed-devices", lambda e: attention(k=qkv()[1].to("meta"), v=qkv()[2].to("meta")), ValueError, "different devices", "cpu", "meta", "expected one device"),
    row("op-k-v-shapes", lambda e: attention(v=qkv(k_len=300)[2]), ValueError, "k has shape (1, 256, 2, 64) but v has (1, 300, 2, 64)", "expected equal shapes"),
    row("op-batch", lambda e: attention(k=qkv(batch=2)[1], v=qkv(batch=2)[2]), ValueError, "q has batch 1 but k has 2", "expected equal batch sizes"),
    row("op-head-dim", lambda e: attention(k=qkv(head_dim=32)[1], v=qkv(head_dim=32)[2]), ValueError, "q has head_dim 64 but k has 32", "expected equal head dims"),
    row("op-gqa-ratio", lambda e: attention(q=qkv(q_heads=3)[0]), ValueError, "q has 3 heads and k has 2", "multiple of the KV heads"),
    row("op-zero-kv-heads", lambda e: attention(k=qkv(kv_heads=0)[1], v=qkv(kv_heads=0)[2]), ValueError, "q has 4 heads and k has 0"),
    row("op-q-longer-than-k", lambda e: attention(q=qkv(q_len=300)[0]), ValueError, "q has 300 tokens and k has 256", "q_len <= k_len"),
    row("op-q-empty", lambda e: attention(q=qkv(q_len=0)[0]), ValueError, "q has 0 tokens", "1 <= q_len <= k_len"),
    row("op-key_start-list", lambda e: attention(key_start=[0]), TypeError, "key_start is list", "expected an int32 or int64 tensor of shape (1,)"),
    row("op-key_start-float", lambda e: attention(key_start=torch.zeros(1)), TypeError, "key_start is a tensor of dtype torch.float32", "int32 or int64"),
    row("op-key_start-shape", lambda e: attention(key_start=torch.zeros(2, dtype=torch.long)), ValueError, "key_start has shape (2,)", "expected (1,)"),
    row("op-key_start-2d", lambda e: attention(key_start=torch.zeros(1, 1, dtype=torch.long)), ValueError, "key_start has shape (1, 1)", "expected (1,)"),
    row("op-key_start-device", lambda e: attention(key_start=torch.zeros(1, dtype=torch.long, device="meta")), ValueError, "key_start is on meta", "q's device cpu"),
    row("op-key_start-too-large", lambda e: attention(key_start=torch.tensor([5000])), ValueError, "key_start", "5000", "expected 0 <= key_start[b] <= k_len"),
    # k_len itself (256) is a sequence of padding only, which is valid: one past it is the first bad value.
    row("op-key_start-past-k_len", lambda e: attention(key_start=torch.tensor([257])), ValueError, "key_start", "257", "expected 0 <= key_start[b] <= k_len"),
    row("op-key_start-negative", lambda e: attention(key_start=torch.tensor([-1], dtype=torch.int32)), ValueError, "key_start", "-1", "expected 0 <= key_start[b] <= k_len"),
    row("op-key_start-int16", lambda e: attention(key_start=torch.zeros(1, dtype=torch.int16)), TypeError, "key_start is a tensor of dtype torch.int16", "int32 or int64"),
    # Batch 2: the bad start is the second sequence's, the first is valid.
    row("op-key_start-second-sequence", lambda e: attention(**batch_of_two(key_start=torch.tensor([0, 257]))), ValueError, "key_start has value 257", "expected 0 <= key_start[b] <= k_len = 256"),
    row("op-config-str", lambda e: attention(config="gamma=0.9"), TypeError, "config has type str", "expected FlexPrefillConfig or None"),
    row("op-config-dict", lambda e: attention(config={"gamma": 0.9}), TypeError, "config has type dict", "expected FlexPrefillConfig or None"),
    row("op-softmax_scale-str", lambda e: attention(softmax_scale="0.125"), TypeError, "softmax_scale='0.125'", "has type str", "expected a float or None"),
    row("op-softmax_scale-list", lambda e: attention(softmax_scale=[0.1]), TypeError, "softmax_scale=[0.1] has type list", "expected a float or None"),
    row("op-softmax_scale-tensor", lambda e: attention(softmax_scale=torch.tensor(0.125)), TypeError, "softmax_scale=", "has type Tensor", "expected a float or None"),
    row("op-softmax_scale-nan", lambda e: attention(softmax_scale=float("nan")), ValueError, "softmax_scale=nan", "expected a finite float"),
    row("op-softmax_scale-inf", lambda e: attention(softmax_scale=float("inf")), ValueError, "softmax_scale=inf", "expected a finite float"),
    row("op-gradients", lambda e: grad_attention("q"), ValueError, "does not support gradients"),
    row("op-gradients-v", lambda e: grad_attention("v"), ValueError, "does not support gradients"),
    row("op-with-stats-key_start", lambda e: flexprefill_attention_with_stats(*qkv(), key_start=torch.tensor([-3])), ValueError, "key_start", "-3", "expected 0 <= key_start[b] <= k_len"),
    row("op-with-stats-config", lambda e: flexprefill_attention_with_stats(*qkv(), config=0.9), TypeError, "config has type float", "expected FlexPrefillConfig or None"),
]

MODEL_ROWS = [
    # patch_model
    row("patch-unsupported", lambda e: patch_model(e.unsupported), ValueError, "'gemma2'", UNSUPPORTED, "llama", "attn_logit_softcapping"),
    row("patch-no-config", lambda e: patch_model(torch.nn.Linear(2, 2)), ValueError, "model_type None", UNSUPPORTED),
    row("patch-not-a-module", lambda e: patch_model("llama"), TypeError, "model='llama' has type str; expected a torch.nn.Module (a transformers model)"),
    row("patch-config-int", lambda e: patch_model(e.plain, 3), TypeError, "config=3 has type int", "expected None, a preset name, a YAML path, a Preset or a FlexPrefillConfig"),
    row("patch-unknown-preset", lambda e: patch_model(e.plain, "no-such-preset"), ValueError, "unknown preset 'no-such-preset'"),
    row("patch-gamma", lambda e: patch_model(e.plain, gamma=2.0), ValueError, "gamma=2.0", "expected 0 < gamma <= 1"),
    row("patch-unknown-override", lambda e: patch_model(e.plain, gama=0.9), TypeError, "unknown FlexPrefillConfig field(s) ['gama']"),
    row("patch-block_size-float", lambda e: patch_model(e.plain, block_size=128.0), TypeError, "block_size=128.0 has type float; expected an int"),
    row("patch-layer-past-end", lambda e: patch_model(e.plain, e.yaml("layers: {5: {gamma: 1.0}}\n")), ValueError, "layers.5", "the model has 2 layers"),
    # unpatch_model, set_layer_config, layer_configs, record_stats, last_stats
    row("unpatch-not-a-module", lambda e: unpatch_model("llama"), TypeError, "model", "str", "Module"),
    row("unpatch-none", lambda e: unpatch_model(None), TypeError, "model=None has type NoneType"),
    row("set-layer-unpatched", lambda e: set_layer_config(e.plain, 0, gamma=0.9), ValueError, "set_layer_config needs a patched model", "patch_model"),
    row("set-layer-unsupported", lambda e: set_layer_config(e.unsupported, 0, gamma=0.9), ValueError, "set_layer_config needs a patched model"),
    row("set-layer-out-of-range", lambda e: set_layer_config(e.patched, 2, gamma=0.9), ValueError, "layer_idx=2", "expected 0 <= layer_idx < 2"),
    row("set-layer-negative", lambda e: set_layer_config(e.patched, -1, gamma=0.9), ValueError, "layer_idx=-1", "expected 0 <= layer_idx < 2"),
    row("set-layer-float-index", lambda e: set_layer_config(e.patched, 0.0, gamma=0.9), TypeError, "layer_idx=0.0 has type float; expected an int"),
    row("set-layer-bool-index", lambda e: set_layer_config(e.patched, True, gamma=0.9), TypeError, "layer_idx=True has type bool; expected an int"),
    row("set-layer-config-dict", lambda e: set_layer_config(e.patched, 0, {"gamma": 0.9}), TypeError, "has type dict", "expected a FlexPrefillConfig or None"),
    row("set-layer-gamma", lambda e: set_layer_config(e.patched, 0, gamma=1.5), ValueError, "gamma=1.5", "expected 0 < gamma <= 1"),
    row("set-layer-unknown-field", lambda e: set_layer_config(e.patched, 0, gama=1.0), TypeError, "unknown FlexPrefillConfig field(s) ['gama']"),
    row("set-layer-block_size-float", lambda e: set_layer_config(e.patched, 0, block_size=64.0), TypeError, "block_size=64.0 has type float; expected an int"),
    row("set-layer-not-a-module", lambda e: set_layer_config("llama", 0), TypeError, "model", "str", "Module"),
    row("layer-configs-unsupported", lambda e: layer_configs(e.unsupported), ValueError, "'gemma2'", UNSUPPORTED),
    row("layer-configs-not-a-module", lambda e: layer_configs("llama"), TypeError, "model", "str", "Module"),
    row("record-stats-unpatched", lambda e: enter(record_stats(e.plain)), ValueError, "record_stats needs a model that runs FlexPrefill attention", "'sdpa'", "patch_model"),
    row("record-stats-unsupported", lambda e: enter(record_stats(e.unsupported)), ValueError, "'gemma2'", UNSUPPORTED),
    row("record-stats-not-a-module", lambda e: enter(record_stats("llama")), TypeError, "model", "str", "Module"),
    row("last-stats-not-a-module", lambda e: last_stats("llama"), TypeError, "model", "str", "Module"),
    # attn_implementation="flexprefill" on an unsupported architecture: transformers (4.53, 5.x) only checks at
    # load time that the name is registered, so the mask function refuses at the first forward, before any
    # layer runs, in training mode too (integration/masks.py).
    row("from-pretrained-unsupported", lambda e: first_forward(e, train=False), ValueError, "'gemma2'", UNSUPPORTED),
    row("from-pretrained-unsupported-train", lambda e: first_forward(e, train=True), ValueError, "'gemma2'", UNSUPPORTED),
]

EXAMPLE_ROWS = [
    row("needle-depth-above-one", cli("needle", "--depth", "1.5"), SystemExit, "argument --depth: 1.5 is out of range; expected 0 <= depth <= 1"),
    row("needle-depth-negative", cli("needle", "--depth", "0.5", "-0.1"), SystemExit, "argument --depth", "-0.1", "expected 0 <= depth <= 1"),
    row("needle-depth-nan", cli("needle", "--depth", "nan"), SystemExit, "argument --depth: nan", "expected 0 <= depth <= 1"),
    row("needle-depth-text", cli("needle", "--depth", "middle"), SystemExit, "argument --depth: 'middle' is not a number"),
    row("needle-gamma-above-one", cli("needle", "--gamma", "1.5"), SystemExit, "argument --gamma: gamma=1.5", "expected 0 < gamma <= 1"),
    row("needle-gamma-zero", cli("needle", "--gamma", "0"), SystemExit, "argument --gamma: gamma=0.0", "expected 0 < gamma <= 1"),
    row("needle-tau-negative", cli("needle", "--tau", "-1"), SystemExit, "argument --tau: tau=-1.0", "expected tau >= 0"),
    row("needle-length-zero", cli("needle", "--length", "0"), SystemExit, "argument --length: 0 is out of range; expected an int >= 1"),
    row("needle-length-float", cli("needle", "--length", "2.5"), SystemExit, "argument --length: '2.5' is not an int"),
    row("needle-max-new-tokens", cli("needle", "--max-new-tokens", "0"), SystemExit, "argument --max-new-tokens: 0", "expected an int >= 1"),
    row("needle-dtype", cli("needle", "--dtype", "float64"), SystemExit, "argument --dtype", "'float64'", "float32"),
    row("needle-device-typo", cli("needle", "--device", "cdua"), SystemExit, "argument --device: 'cdua' is not a device", "cpu, cuda"),
    row("needle-device-cuda", cli("needle", "--device", "cuda"), SystemExit, "argument --device: 'cuda' needs a CUDA device", marks=no_cuda),
    row("chat-context-missing", lambda e: example("chat").parse_args(["--context", str(e.tmp_path / "none.txt")]), SystemExit, "argument --context", "none.txt", "is not a readable file"),
    row("chat-max-new-tokens", cli("chat", "--max-new-tokens", "-3"), SystemExit, "argument --max-new-tokens: -3", "expected an int >= 1"),
    row("chat-device-typo", cli("chat", "--device", "gpu"), SystemExit, "argument --device: 'gpu' is not a device"),
    row("generate-long-tokens", cli("generate", "--long-tokens", "-1"), SystemExit, "argument --long-tokens: -1", "expected an int >= 0"),
    row("generate-max-new-tokens", cli("generate", "--max-new-tokens", "0"), SystemExit, "argument --max-new-tokens: 0", "expected an int >= 1"),
]


@pytest.fixture(scope="module")
def models():
    plain = tiny_model("llama")
    patched = patch_model(tiny_model("llama", seed=1))
    return {"plain": plain, "patched": patched, "unsupported": tiny_unsupported_model()}


@pytest.mark.parametrize("call,exc,fragments", CONFIG_ROWS + PRESET_ROWS + OPERATOR_ROWS + MODEL_ROWS + EXAMPLE_ROWS)
def test_bad_input(call, exc, fragments, tmp_path, models, capsys):
    env = Env(tmp_path, models)
    plain_before = layer_configs_or_none(env.plain)
    patched_before = layer_configs(env.patched)
    try:
        with pytest.raises(exc) as info:
            call(env)
        if exc is SystemExit:
            assert info.value.code == 2, f"argparse exits with status 2 on a bad argument; got {info.value.code!r}"
            message = capsys.readouterr().err
        else:
            message = str(info.value)
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} is not in the message the user sees: {message!r}"
        # A rejected call changes nothing.
        assert layer_configs_or_none(env.plain) == plain_before
        assert layer_configs(env.patched) == patched_before
        assert env.plain.config._attn_implementation == "sdpa"
    finally:
        # A call that wrongly succeeded must not leak into the next rows.
        unpatch_model(env.plain)
        patch_model(env.patched)


def layer_configs_or_none(model):
    return None if "_flexprefill_patch" not in model.__dict__ else layer_configs(model)


def test_example_rejects_bad_argument_before_loading():
    """As a user runs it: the script stops at once, with status 2 and argparse's message, and never loads."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "needle.py"), "--gamma", "1.5"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "needle.py: error: argument --gamma: gamma=1.5 is not supported; expected 0 < gamma <= 1" in result.stderr
    assert "loaded" not in result.stdout


def test_rejected_patch_leaves_model_unpatched(models):
    """patch_model with a bad override changes nothing: the model still runs SDPA and has no patch record."""
    model = models["plain"]
    with pytest.raises(ValueError):
        patch_model(model, gamma=2.0)
    assert "_flexprefill_patch" not in model.__dict__
    assert model.config._attn_implementation == "sdpa"
    assert flexprefill_hf.last_stats(model) is None
