"""Small random-weight models of every registered architecture, built from their real transformers classes."""

from __future__ import annotations

import inspect

import torch
import transformers

from flexprefill_hf.integration import register

register()

ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "phi3", "gemma3_text", "glm", "glm4")
VOCAB = 128
# Blocks of 64 and a 128-token minimum budget: the dense threshold is 128 tokens, so prompts of a few
# hundred tokens and more take the sparse path.
SPARSE = dict(block_size=64, min_budget=128)
# gamma = 1 and tau = 0: every head is vertical-slash and keeps every block that has any attention.
EXACT = dict(gamma=1.0, tau=0.0, **SPARSE)

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    # Larger than the usual 0.02 so that attention is peaked and gamma < 1 really drops blocks.
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # The 7:1 grouped-query ratio of Qwen2-7B (28 query, 4 KV heads), scaled down.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=112, num_attention_heads=7, num_key_value_heads=1)),
    # head_dim is explicit in Qwen3 (128 by default, whatever the hidden size).
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    ),
    # No window, as Mistral-7B-v0.2 and later (MistralConfig's own default is 4096, as v0.1).
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    # Gemma 3's pattern scaled down: a sliding layer (window 256: dense on the test prompts) then a global one.
    # query_pre_attn_scalar 64 != head_dim 16: the scale transformers passes (1/8) is not 1/sqrt(head_dim).
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=64,
            sliding_window=256,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(head_dim=16)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=16)),
}
# An architecture the registry does not list, for the refusal tests: Gemma 2 caps attention logits (softcap).
UNSUPPORTED_MODEL_TYPE = "gemma2"


def tiny_model(architecture: str, seed: int = 0, **changes) -> torch.nn.Module:
    """A float32 model in eval mode, attention "sdpa", random weights from ``seed``."""
    config_name, model_name, specific = _SPECS[architecture]
    config = getattr(transformers, config_name)(**{**_COMMON, **specific, **changes})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def tiny_unsupported_model(seed: int = 0, **changes) -> torch.nn.Module:
    """A float32 Gemma 2 model (an architecture the registry refuses), eval mode, attention "eager".

    Eager: transformers 5.x refuses SDPA for Gemma 2, whose softcapping SDPA cannot apply either.
    """
    config = transformers.Gemma2Config(**{**_COMMON, "head_dim": 16, **changes})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.Gemma2ForCausalLM(config).eval()


def sliding_windows(model: torch.nn.Module) -> list:
    """Each attention layer's sliding window (None: full attention), as the registry's check reads it."""
    from flexprefill_hf.patches import lookup
    from flexprefill_hf.patches.common import layer_sliding_window

    modules = lookup(model.config.model_type).attention_modules(model)
    return [layer_sliding_window(model, m) for m in modules]


def window_active(model: torch.nn.Module, keys: int) -> list:
    """Per layer: True where a sliding window cuts ``keys`` keys (the routing then runs the layer dense)."""
    return [w is not None and keys > w for w in sliding_windows(model)]


def random_ids(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    """Token ids in [3, VOCAB): never the pad, bos or eos token."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` in transformers 5.x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def left_pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors into (input_ids, attention_mask, position_ids) as ``generate`` would."""
    length = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq) :] = seq
        mask[row, length - len(seq) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """Equal to fp32 rounding: error within rtol of the largest |expected|."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())
