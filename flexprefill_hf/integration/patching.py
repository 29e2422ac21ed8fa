"""patch_model / unpatch_model, per-layer configurations, and statistics recording.

``patch_model`` changes as little as it can and writes down every change, so that
``unpatch_model`` puts back exactly what was there:

* each attention module gets ``flexprefill_config`` (its layer's :class:`FlexPrefillConfig`);
* every config of the model gets ``_attn_implementation = "flexprefill"``, through
  ``model.set_attn_implementation`` where transformers has it (5.x), else directly (4.5x);
* the model gets ``_flexprefill_patch``, the record of the above.

No forward method is replaced. Statistics are recorded only inside ``record_stats(model)``:
outside it the attention function looks up one missing attribute per layer and stores nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator, Optional, Union

import torch

from flexprefill_hf.patches import lookup

from ..config import FlexPrefillConfig
from ..ops.flexprefill import FlexPrefillStats
from .attention import ATTENTION_NAME, CONFIG_ATTRIBUTE, RECORDER_ATTRIBUTE, layer_config
from .presets import Preset, load_preset, match_preset

PATCH_ATTRIBUTE = "_flexprefill_patch"
STATS_ATTRIBUTE = "_flexprefill_stats"
_MISSING = object()

ConfigLike = Union[None, str, os.PathLike, FlexPrefillConfig, Preset]


@dataclasses.dataclass
class _PatchRecord:
    """What patch_model changed: (object, attribute, value before) in the order of the changes."""

    changes: list[tuple[Any, str, Any]] = dataclasses.field(default_factory=list)
    attn_implementations: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)

    def set(self, obj: Any, name: str, value: Any) -> None:
        """setattr, remembering the first value it replaces."""
        if not any(o is obj and n == name for o, n, _ in self.changes):
            self.changes.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)


class StatsRecorder:
    """Per-layer :class:`FlexPrefillStats` of the last prefill; None where a layer ran outside the operator."""

    def __init__(self, num_layers: int) -> None:
        self.stats: list[Optional[FlexPrefillStats]] = [None] * num_layers

    def record(self, layer_idx: int, stats: Optional[FlexPrefillStats]) -> None:
        self.stats[layer_idx] = stats


def patch_model(model: torch.nn.Module, config: ConfigLike = None, **overrides) -> torch.nn.Module:
    """Make ``model`` run FlexPrefill attention; returns the model.

    Args:
        model: a transformers model of a registered architecture (``flexprefill_hf.patches``).
        config: None (the preset matched by model type and name), a preset name, a YAML path,
            a :class:`Preset` or a :class:`FlexPrefillConfig` (the same for every layer).
        overrides: FlexPrefillConfig fields applied on top, in every layer (``gamma=0.9``).

    Patching a patched model replaces its configuration; ``unpatch_model`` still restores the
    state before the first patch.
    """
    architecture = lookup(getattr(model.config, "model_type", None))
    modules = architecture.attention_modules(model)
    architecture.check(model, modules)
    configs = resolve_layer_configs(model.config, config, len(modules), **overrides)

    record = model.__dict__.get(PATCH_ATTRIBUTE)
    if record is None:
        record = _PatchRecord()
        record.attn_implementations = [(c, _raw_attn_implementation(c)) for c in _configs_of(model)]
        record.set(model, PATCH_ATTRIBUTE, record)
    for module, module_config in zip(modules, configs):
        record.set(module, CONFIG_ATTRIBUTE, module_config)
    _set_attn_implementation(model, ATTENTION_NAME)
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``patch_model`` exactly (attributes and attention implementation); a no-op on an unpatched model."""
    record = model.__dict__.get(PATCH_ATTRIBUTE)
    if record is None:
        return model
    for obj, name, before in reversed(record.changes):
        if before is _MISSING:
            delattr(obj, name)
        else:
            setattr(obj, name, before)
    for config, before in record.attn_implementations:
        _restore_attn_implementation(config, before)
    model.__dict__.pop(STATS_ATTRIBUTE, None)
    return model


def set_layer_config(model: torch.nn.Module, layer_idx: int, config: Optional[FlexPrefillConfig] = None, **overrides):
    """Give one layer of a patched model its own configuration (``config``, or its current one with ``overrides``)."""
    record = model.__dict__.get(PATCH_ATTRIBUTE)
    if record is None:
        raise ValueError("set_layer_config needs a patched model; call flexprefill_hf.patch_model(model) first")
    modules = lookup(model.config.model_type).attention_modules(model)
    if not 0 <= layer_idx < len(modules):
        raise ValueError(f"layer_idx={layer_idx} is out of range; the model has {len(modules)} layers")
    base = getattr(modules[layer_idx], CONFIG_ATTRIBUTE) if config is None else config
    if not isinstance(base, FlexPrefillConfig):
        raise TypeError(f"config has type {type(base).__name__}; expected FlexPrefillConfig or None")
    record.set(modules[layer_idx], CONFIG_ATTRIBUTE, base.replace(**overrides) if overrides else base)


def layer_configs(model: torch.nn.Module) -> tuple[FlexPrefillConfig, ...]:
    """The configuration each layer runs with (patched, or the preset of ``attn_implementation="flexprefill"``)."""
    return tuple(layer_config(m) for m in lookup(model.config.model_type).attention_modules(model))


def resolve_layer_configs(
    model_config: Any, config: ConfigLike, num_layers: int, **overrides
) -> tuple[FlexPrefillConfig, ...]:
    """One FlexPrefillConfig per layer from what ``patch_model`` accepts."""
    if config is None:
        model_type = getattr(model_config, "model_type", None)
        name = getattr(model_config, "_name_or_path", "") or ""
        config = match_preset(model_type, name, default=lookup(model_type).default_preset)
    elif isinstance(config, (str, os.PathLike)):
        config = load_preset(config)
    if isinstance(config, Preset):
        configs = config.layer_configs(num_layers)
    elif isinstance(config, FlexPrefillConfig):
        configs = (config,) * num_layers
    else:
        raise TypeError(
            f"config has type {type(config).__name__}; expected None, a preset name, a YAML path, a Preset "
            "or a FlexPrefillConfig"
        )
    if overrides:
        configs = tuple(c.replace(**overrides) for c in configs)
    return configs


@contextlib.contextmanager
def record_stats(model: torch.nn.Module) -> Iterator[StatsRecorder]:
    """Record the per-layer statistics of every prefill run inside the block.

    Yields the recorder; after the block ``last_stats(model)`` returns the same list. Decode steps
    are not recorded, so after ``generate`` the statistics are those of the prompt's prefill.
    """
    modules = lookup(getattr(model.config, "model_type", None)).attention_modules(model)
    recorder = StatsRecorder(len(modules))
    model.__dict__[STATS_ATTRIBUTE] = recorder
    previous = [m.__dict__.get(RECORDER_ATTRIBUTE, _MISSING) for m in modules]
    for module in modules:
        setattr(module, RECORDER_ATTRIBUTE, recorder)
    try:
        yield recorder
    finally:
        for module, before in zip(modules, previous):
            if before is _MISSING:
                delattr(module, RECORDER_ATTRIBUTE)
            else:
                setattr(module, RECORDER_ATTRIBUTE, before)


def last_stats(model: torch.nn.Module) -> Optional[list[Optional[FlexPrefillStats]]]:
    """Per-layer statistics of the last prefill recorded by ``record_stats``; None if nothing was recorded.

    Each entry is a :class:`FlexPrefillStats` (per batch and query head: pattern chosen, JS distance,
    blocks and fraction computed), or None for a layer that ran dense outside the operator.
    """
    recorder = model.__dict__.get(STATS_ATTRIBUTE)
    return None if recorder is None else list(recorder.stats)


def _configs_of(model: torch.nn.Module) -> list[Any]:
    """Every distinct config object of the model: its own, its sub-configs and its sub-models'."""
    found: dict[int, Any] = {}
    pending = [model.config] + [getattr(m, "config", None) for m in model.modules()]
    while pending:
        config = pending.pop()
        if config is None or id(config) in found or not hasattr(config, "_attn_implementation"):
            continue
        found[id(config)] = config
        pending.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})
    return list(found.values())


def _raw_attn_implementation(config: Any) -> Any:
    # The internal attribute holds what was set (None included); the property may map None to "eager".
    return config.__dict__.get("_attn_implementation_internal", _MISSING)


def _restore_attn_implementation(config: Any, before: Any) -> None:
    if before is _MISSING:
        config.__dict__.pop("_attn_implementation_internal", None)
    else:
        config.__dict__["_attn_implementation_internal"] = before


def _set_attn_implementation(model: torch.nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        for config in _configs_of(model):
            config._attn_implementation = name
