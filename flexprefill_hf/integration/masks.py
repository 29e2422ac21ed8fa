"""The mask function registered with transformers' ``AttentionMaskInterface`` under "flexprefill".

transformers calls it once per forward (not once per layer) from ``create_causal_mask`` /
``create_sliding_window_causal_mask``. Like transformers' flash-attention mask it never builds a
``[q_len, k_len]`` mask (gigabytes per sequence at 128K): it returns

    None                   when no key is padding,
    bool [B, kv_length]    the 2-D padding mask (True = real token) of a left-padded batch,

after checking, once per forward, that the padding is on the left: FlexPrefill places the queries
at the last positions, so right padding raises ValueError. Only a mask the operator cannot express
at all -- a custom mask function (packed sequences, or-/and-masks, bidirectional), or queries that
are not the last keys (a static cache) -- is delegated to transformers' ``sdpa_mask``; the attention
function then sees a 4-D mask and runs dense.

It is also where a model loaded with ``from_pretrained(..., attn_implementation="flexprefill")`` of an
unsupported architecture fails: at the first forward, before any layer runs, in training mode too (the
check is a dict lookup per forward). Not at load time, because transformers runs nothing of ours then.
What it does at load, read in transformers 5.24 (``modeling_utils.py``; 4.53.3's
``_autoset_attn_implementation``, lines 2217-2347, makes the same two key-membership tests):

* ``PreTrainedModel.__init__`` (line 1258) calls ``_check_and_adjust_attn_implementation`` (1710), which for
  a name that is not a hub kernel calls ``get_correct_attn_implementation`` (1832, 1855); that tests only
  ``name in ["eager"] + ALL_ATTENTION_FUNCTIONS.valid_keys()`` (1857). ``GeneralInterface.valid_keys``
  (``utils/generic.py`` 1248) lists the keys: the registered value is never read, let alone called, so a
  callable object in its place would learn nothing at load either.
* ``set_attn_implementation`` (1970) goes through the same check (2000); the config's
  ``_attn_implementation`` setter (``configuration_utils.py`` 599) stores the string.
* The first read of the registered value is ``AttentionInterface.get_interface`` (5261), called by each
  attention module's forward (``models/llama/modeling_llama.py`` 254) -- after this mask function, which
  ``create_causal_mask`` calls earlier in the same forward with the model's config.

The only load-time hooks left would be a key that is a ``str`` subclass with its own ``__eq__`` (it would
see the name, never the model) or wrapping ``from_pretrained``; neither is clean, so we do neither.
"""

from __future__ import annotations

from typing import Optional

import torch

from flexprefill_hf.patches import lookup


def flexprefill_mask(
    batch_size: int,
    q_length: Optional[int] = None,
    kv_length: Optional[int] = None,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> Optional[torch.Tensor]:
    """transformers' mask-interface contract (keyword arguments; 4.53 passes ``cache_position`` instead of
    ``q_length``/``q_offset``). Returns None or the bool [batch_size, kv_length] padding mask; see the module
    docstring for the rare 4-D case.

    Raises:
        ValueError: ``config.model_type`` is not supported ("... is not supported by FlexPrefill; supported
            model types: ..."), or the batch is padded on the right.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    config = kwargs.get("config")  # passed by transformers 4.53 and 5.x
    if config is not None:
        lookup(getattr(config, "model_type", None))
    arguments = dict(
        batch_size=batch_size,
        kv_length=kv_length,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )
    if q_length is not None:
        arguments.update(q_length=q_length, q_offset=q_offset)
    # The sliding-window mask arrives with `local_size`; the attention function applies the window itself.
    plain = mask_function is None or mask_function is causal_mask_function or kwargs.get("local_size") is not None
    if not plain or not _queries_are_last(attention_mask, q_length, q_offset, kv_length, kv_offset, kwargs):
        # Materialised: a None here would read as "plain causal" to the attention function.
        arguments.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        return sdpa_mask(**arguments)
    if attention_mask is None:
        return None
    padding = attention_mask[:, -kv_length:].to(torch.bool)  # [B, kv_length]
    # One host sync per forward, as transformers' own flash-attention mask does.
    if bool(padding.all()):
        return None
    check_left_padding(padding)
    return padding


def check_left_padding(padding: torch.Tensor) -> None:
    """ValueError unless every row of the bool [B, K] mask is False...False True...True."""
    # A real token followed by a padding token is right (or inner) padding.
    bad_rows = (padding[:, :-1] & ~padding[:, 1:]).any(-1)  # [B]
    if bool(bad_rows.any()):
        rows = bad_rows.nonzero().flatten().tolist()
        raise ValueError(
            f"FlexPrefill supports left padding only, but sequences {rows} of the batch have padding after a "
            "real token; pad on the left (tokenizer.padding_side = 'left')"
        )


def _queries_are_last(attention_mask, q_length, q_offset, kv_length, kv_offset, kwargs) -> bool:
    """True when the queries are the last ``q_length`` of the ``kv_length`` keys (no static cache)."""
    end = kv_offset + kv_length
    if attention_mask is not None:
        return attention_mask.shape[-1] == end
    if q_length is not None:
        # A tensor offset comes from a static cache layer: its keys are preallocated past the queries.
        return not isinstance(q_offset, torch.Tensor) and q_offset + q_length == end
    cache_position = kwargs.get("cache_position")  # transformers 4.5x
    return cache_position is None or int(cache_position[-1]) + 1 == end
