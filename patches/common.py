"""What every architecture entry shares: its description and the checks of its attention modules.

An entry never replaces a forward method. transformers' attention modules already hand their
query/key/value to the function registered under ``config._attn_implementation``; an entry only
names those modules, and its ``check`` verifies the attributes the FlexPrefill attention function
relies on before ``patch_model`` changes anything.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional, Sequence

import torch

_NO_ATTRIBUTE = object()


def check_head_layout(model: torch.nn.Module, modules: Sequence[torch.nn.Module]) -> None:
    """Check the grouped-query layout the attention function assumes.

    Query head h reads KV head h // G (G = ``num_key_value_groups``), as transformers' ``repeat_kv``
    orders heads; q_proj, k_proj and v_proj (or a fused qkv_proj) must produce whole heads of ``head_dim``;
    attention is causal.
    """
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads % kv_heads != 0:
        raise ValueError(
            f"num_attention_heads={heads!r}, num_key_value_heads={kv_heads!r}; expected the query heads to be "
            "a multiple of the KV heads"
        )
    for module in modules:
        name = f"{type(module).__name__} (layer {module.layer_idx})"
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int):
            raise ValueError(f"{name} has no integer `head_dim`; got {head_dim!r}")
        groups = getattr(module, "num_key_value_groups", heads // kv_heads)
        if groups != heads // kv_heads:
            raise ValueError(f"{name} has num_key_value_groups={groups}; expected {heads // kv_heads}")
        # Separate projections (most families), or one fused qkv_proj (Phi-3) split in this order.
        fused = heads + 2 * kv_heads
        for proj, count in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads), ("qkv_proj", fused)):
            out_features = getattr(getattr(module, proj, None), "out_features", None)
            if out_features is not None and out_features != count * head_dim:
                raise ValueError(
                    f"{name}.{proj} has {out_features} outputs; expected {count} heads x head_dim {head_dim}"
                )
        if not getattr(module, "is_causal", True):
            raise ValueError(f"{name} is not causal; FlexPrefill is a causal prefill attention")


def layer_sliding_window(model: torch.nn.Module, module: torch.nn.Module) -> Optional[int]:
    """The sliding window of one attention layer in tokens, or None when it attends to every earlier token.

    transformers states it in one of two ways: ``module.sliding_window`` on each layer (Qwen2, Qwen3,
    Gemma 3: None on the full-attention layers), or, for modules without the attribute (Mistral, Phi-3),
    ``config.sliding_window`` for every layer, which those modules pass to the attention function.
    """
    window = getattr(module, "sliding_window", _NO_ATTRIBUTE)
    if window is _NO_ATTRIBUTE:
        window = getattr(model.config, "sliding_window", None)
    return window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


def warn_sliding_window_layers(model: torch.nn.Module, modules: Sequence[torch.nn.Module]) -> None:
    """Warn once per patch about layers with a sliding window: the attention function runs them dense.

    A FlexPrefill block pattern cannot express the window, so those layers fall back to SDPA with the
    window once a prompt is longer than it; shorter prompts never reach the window and run FlexPrefill.
    The decision is per layer (Gemma 3 mixes sliding and global layers) and is named here once, not per call.
    """
    windows = {m.layer_idx: layer_sliding_window(model, m) for m in modules}
    windowed = [i for i, w in windows.items() if w is not None]
    if windowed:
        sizes = sorted({windows[i] for i in windowed})
        size_text = f"{sizes[0]} tokens" if len(sizes) == 1 else f"{sizes} tokens"
        layers_text = "all layers" if len(windowed) == len(modules) else f"layers {windowed}"
        warnings.warn(
            f"{type(model).__name__}: {layers_text} use a sliding window of {size_text}; FlexPrefill cannot "
            f"express it, so these layers run dense attention on prompts longer than {min(sizes)} tokens",
            UserWarning,
            stacklevel=4,  # the caller of patch_model (through check_model and patch_model)
        )


def check_model(model: torch.nn.Module, modules: Sequence[torch.nn.Module]) -> None:
    """The check every registered family uses unless its entry names its own."""
    check_head_layout(model, modules)
    warn_sliding_window_layers(model, modules)


@dataclasses.dataclass(frozen=True)
class ArchitecturePatch:
    """One supported architecture family.

    Attributes:
        family: short name, used in messages.
        model_types: the ``config.model_type`` values of the family.
        attention_classes: class names of its attention modules (stable across transformers versions).
        check: ``check(model, modules)`` raises ValueError when the model does not have the layout the
            attention function expects; may warn about layers that will run dense.

    Which preset a model gets is decided by the ``match:`` sections of the YAML files in ``configs/``,
    not here.
    """

    family: str
    model_types: tuple[str, ...]
    attention_classes: tuple[str, ...]
    check: Callable[[torch.nn.Module, Sequence[torch.nn.Module]], None] = check_model

    def attention_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The model's attention modules ordered by ``layer_idx``, one per decoder layer."""
        modules = [m for m in model.modules() if type(m).__name__ in self.attention_classes]
        if not modules:
            raise ValueError(
                f"{type(model).__name__} has no attention module of class {self.attention_classes}; "
                f"expected a transformers {self.family} model"
            )
        indices = [getattr(m, "layer_idx", None) for m in modules]
        if any(not isinstance(i, int) for i in indices):
            raise ValueError(f"{type(modules[0]).__name__} modules need an integer `layer_idx`; got {indices}")
        if sorted(indices) != list(range(len(modules))):
            raise ValueError(f"attention layer indices are {sorted(indices)}; expected 0..{len(modules) - 1}")
        return sorted(modules, key=lambda m: m.layer_idx)
