"""FlexPrefill under transformers' continuous batching (``model.generate_batch``, ``transformers serve``).

transformers 5.x batches requests for continuous batching (CB) by packing them: every forward step hands
the attention function one row of packed queries, ``query [1, Hq, total_q, D]`` (the new tokens of all
scheduled requests: prompt chunks and decode rows), with ``cu_seq_lens_q`` / ``max_length_q`` and the keys
of the same requests, ``key/value [1, Hkv, total_k, D]`` (cached + new tokens, read from the paged cache
by ``PagedAttentionCache.update`` before the call), with ``cu_seq_lens_k`` / ``max_length_k`` -- flash-attn's
varlen layout. :func:`flexprefill_paged_attention_forward` serves that call with
``ops.varlen.flexprefill_attention_varlen``: FlexPrefill for long prompts, dense for short ones and decode
rows, in one launch, without unpacking.

Why the implementation's name contains "flash" (transformers 5.24, the installed version):
``ContinuousBatchingManager.switch_to_cb_friendly_attn`` (generation/continuous_batching/continuous_api.py)
accepts only "paged|eager", "sdpa" or a name for which ``is_flash_attention_requested`` holds, which is
``"flash" in name`` (utils/generic.py). For every other name -- "flexprefill" included -- generate_batch
raises "Implementation ... is not supported for continuous batching". A flash name also makes CB build no
attention mask (``attn_mask_is_needed``: only "paged|eager" and "sdpa") and call with ``is_causal=True``
and the varlen keywords. It does not turn on CB's decode fast path (``flash_attn_with_kvcache`` with a
block table): that path asks ``is_flash_attention_requested(config, version=[2, 3])``, a regex
``.*flash.*2`` / ``.*flash.*3`` that :data:`CB_ATTENTION_NAME` does not match, so K/V always arrive read
from the paged cache into packed tensors.

Before transformers 5.23 (5.17 is the GPU machine's) ``switch_to_cb_friendly_attn`` itself switches a
flash name without the prefix to ``"paged|" + name`` through ``set_attn_implementation``, which accepts
only names registered as such: there the config gets :data:`CB_PAGED_ATTENTION_NAME` directly (the prefix
makes CB keep it), and both names are registered (:func:`cb_attention_name`).

The name is set on the model config directly, not by ``model.set_attn_implementation``: for a name that
contains "flash" the latter calls ``lazy_import_flash_attention`` (modeling_utils.py,
``_check_and_adjust_attn_implementation``), which would try to load a Hub kernel called "flexprefill_flash".
Masks: for a ``PagedAttentionCache`` ``masking_utils._preprocess_mask_arguments`` returns no mask whatever the
implementation, so no mask function is registered.

Use::

    from flexprefill_hf.integration.continuous_batching import patch_model_for_continuous_batching
    patch_model_for_continuous_batching(model, gamma=0.9)        # patch_model + the CB implementation
    outputs = model.generate_batch(prompts, generation_config)   # FlexPrefill prefill, paged KV

``unpatch_model`` restores the implementation the model had before the first patch. Outside continuous
batching (no ``cu_seq_lens_q``) the function routes to the ordinary FlexPrefill attention function, so
``generate`` keeps working on the same model.

Not served (ValueError naming the reason): sliding-window layers (Mistral with a window, Gemma 3's local
layers: CB hands them the window's keys, which FlexPrefill's causal grid cannot express), attention
dropout, ``output_attentions``, and a block table (CB's decode fast path, which this name never enables).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.varlen import flexprefill_attention_varlen
from .layer_config import layer_config
from .patching import patch_model
from .routing import _sliding_window, flexprefill_attention_forward

# Must contain "flash" (see the module docstring) and must not match ".*flash.*[23]".
CB_ATTENTION_NAME = "flexprefill_flash"
# The same function under the "paged|" prefix, which continuous batching before transformers 5.23 asks for.
CB_PAGED_ATTENTION_NAME = "paged|" + CB_ATTENTION_NAME
# From this transformers version on the prefix is deprecated and CB keeps a flash name as it is.
_PLAIN_NAME_FROM = (5, 23)


def cb_attention_name() -> str:
    """The attn_implementation :func:`patch_model_for_continuous_batching` sets for the installed transformers:
    :data:`CB_ATTENTION_NAME`, or :data:`CB_PAGED_ATTENTION_NAME` before transformers 5.23."""
    import transformers

    version = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    return CB_ATTENTION_NAME if version >= _PLAIN_NAME_FROM else CB_PAGED_ATTENTION_NAME


def flexprefill_paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    cu_seq_lens_q: Optional[torch.Tensor] = None,
    cu_seq_lens_k: Optional[torch.Tensor] = None,
    max_length_q: Optional[int] = None,
    max_length_k: Optional[int] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract for continuous batching; returns (out [1, total_q, Hq, D], None).

    Args:
        module: the attention module (``layer_idx`` selects the layer's FlexPrefill configuration).
        query: [1, Hq, total_q, D]; key, value: [1, Hkv, total_k, D], the requests' tokens packed.
        attention_mask: None under continuous batching.
        cu_seq_lens_q, cu_seq_lens_k: int32 [B + 1]; max_length_q, max_length_k: Python ints (upper bounds).
            Without them (not a continuous-batching call) the ordinary FlexPrefill function is called.
        scaling: softmax scale; dropout must be 0.
    """
    if cu_seq_lens_q is None:
        return flexprefill_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    cache = kwargs.pop("cache", None)
    # Before transformers 5.23 the lengths come under flash-attn's names, per layer type when the model mixes them.
    max_length_q = kwargs.pop("max_seqlen_q", None) if max_length_q is None else max_length_q
    max_length_k = kwargs.pop("max_seqlen_k", None) if max_length_k is None else max_length_k
    if isinstance(cu_seq_lens_k, dict):
        layer_type = "sliding_attention" if getattr(module, "sliding_window", None) else "full_attention"
        cu_seq_lens_k, max_length_k = cu_seq_lens_k[layer_type], max_length_k[layer_type]
    reason = _unsupported(module, dropout, int(max_length_k), kwargs)
    if reason is not None:
        raise ValueError(f"{CB_ATTENTION_NAME} under continuous batching: {reason}")
    config = layer_config(module)
    q = query[0].transpose(0, 1)  # [total_q, Hq, D], a view
    if cache is not None:
        # transformers < 5.23: key/value are the new tokens only; the attention function writes them to the paged
        # cache and reads back every request's keys, [total_k, Hkv, D] (5.23 on: the model did it before the call).
        k, v = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                            read_index=kwargs["read_index"], write_index=kwargs["write_index"])
    else:
        k, v = (t[0].transpose(0, 1) for t in (key, value))  # [total_k, Hkv, D] views, no copy
    cu_k = cu_seq_lens_k.to(torch.int32)  # CB casts it already (cache.update); a no-op then
    out = flexprefill_attention_varlen(
        q, k, v, cu_seq_lens_q.to(torch.int32), cu_k, int(max_length_q), int(max_length_k), config,
        softmax_scale=scaling,
    )
    return out[None], None


def _unsupported(module, dropout, max_length_k: int, kwargs) -> Optional[str]:
    if kwargs.get("block_table") is not None:
        return "a block table (the decode fast path) is not supported; K/V must be read from the cache"
    if dropout and dropout > 0:
        return "attention dropout (training) is not supported"
    if kwargs.get("output_attentions", False):
        return "output_attentions=True needs the attention weights, which FlexPrefill never forms"
    window = _sliding_window(module, kwargs)
    # As in routing.dense_reason: a window only matters once the keys outgrow it.
    if window is not None and max_length_k > window:
        return (f"layer {getattr(module, 'layer_idx', '?')} has a sliding window of {window} tokens, active at "
                f"{max_length_k} keys, which FlexPrefill cannot express")
    return None


def register_continuous_batching() -> None:
    """Register :func:`flexprefill_paged_attention_forward` with transformers as :data:`CB_ATTENTION_NAME` and
    :data:`CB_PAGED_ATTENTION_NAME` (idempotent), with FlexPrefill's mask function. Continuous batching builds
    no mask (a paged cache gets none, masking_utils), but ``generate`` on the same model does: without a mask
    function registered under these names transformers would hand a left-padded batch no mask at all."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from .masks import flexprefill_mask

    for name in (CB_ATTENTION_NAME, CB_PAGED_ATTENTION_NAME):
        AttentionInterface.register(name, flexprefill_paged_attention_forward)
        AttentionMaskInterface.register(name, flexprefill_mask)


def patch_model_for_continuous_batching(model: torch.nn.Module, config=None, **overrides) -> torch.nn.Module:
    """``patch_model(model, config, **overrides)``, then switch the model to :data:`CB_ATTENTION_NAME` so that
    ``model.generate_batch`` runs FlexPrefill on its packed batches. Returns the model; ``unpatch_model``
    undoes both. Arguments and errors as ``patch_model``."""
    register_continuous_batching()
    patch_model(model, config, **overrides)
    # Not set_attn_implementation: it would try to load a Hub kernel for a name containing "flash".
    model.config._attn_implementation = cb_attention_name()  # recursive over sub-configs (PretrainedConfig)
    return model
