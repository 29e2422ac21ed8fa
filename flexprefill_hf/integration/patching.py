"""patch_model / unpatch_model, and the per-layer configuration of a patched model.

``patch_model`` changes as little as it can and writes down every change, so that
``unpatch_model`` puts back exactly what was there:

* each attention module gets ``flexprefill_config`` (its layer's :class:`FlexPrefillConfig`);
* every config of the model gets ``_attn_implementation = "flexprefill"``, through
  ``model.set_attn_implementation`` where transformers has it (5.x), else directly (4.5x);
* the model gets ``_flexprefill_patch``, the record of the above.

No forward method is replaced. The configuration lives on the modules, so two models patched with
different configurations in one process do not see each other's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from flexprefill_hf.patches import check_model_argument, lookup_model

from ..config import FlexPrefillConfig
from .layer_config import CONFIG_ATTRIBUTE, ConfigLike, layer_config, resolve_layer_configs
from .routing import ATTENTION_NAME
from .stats import STATS_ATTRIBUTE

PATCH_ATTRIBUTE = "_flexprefill_patch"
_MISSING = object()


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


def patch_model(model: torch.nn.Module, config: ConfigLike = None, **overrides) -> torch.nn.Module:
    """Make ``model`` run FlexPrefill attention; returns the model.

    Args:
        model: a transformers model of a registered architecture (``flexprefill_hf.patches``).
        config: None (the preset matched by model type and name), a preset name, a YAML path,
            a :class:`Preset` or a :class:`FlexPrefillConfig` (the same for every layer).
        overrides: FlexPrefillConfig fields applied on top, in every layer (``gamma=0.9``).

    Patching a patched model replaces its configuration; ``unpatch_model`` still restores the
    state before the first patch. Nothing is changed when an argument is rejected.

    Raises:
        ValueError: unsupported model type ("... is not supported by FlexPrefill; supported model types:
            ..."), a layout the attention function cannot serve, a bad preset or field value.
        TypeError: ``model`` is not a torch module, ``config`` of another type, an unknown or mistyped field.
    """
    architecture = lookup_model(model)
    modules = architecture.attention_modules(model)
    architecture.check(model, modules)
    configs = resolve_layer_configs(
        config,
        model.config.model_type,
        getattr(model.config, "_name_or_path", "") or "",
        len(modules),
        **overrides,
    )

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
    """Undo ``patch_model`` exactly (attributes and attention implementation); a no-op on an unpatched model.

    TypeError when ``model`` is not a torch module.
    """
    check_model_argument(model)
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


def set_layer_config(
    model: torch.nn.Module, layer_idx: int, config: Optional[FlexPrefillConfig] = None, **overrides
) -> None:
    """Give one layer of a patched model its own configuration (``config``, or its current one with ``overrides``).

    Raises:
        ValueError: the model is not patched, or ``layer_idx`` is out of range.
        TypeError: ``model`` is not a torch module, ``layer_idx`` is not an int, ``config`` is not a
            FlexPrefillConfig or None, an unknown or mistyped field.
    """
    check_model_argument(model)
    record = model.__dict__.get(PATCH_ATTRIBUTE)
    if record is None:
        raise ValueError("set_layer_config needs a patched model; call flexprefill_hf.patch_model(model) first")
    modules = lookup_model(model).attention_modules(model)
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
        raise TypeError(f"layer_idx={layer_idx!r} has type {type(layer_idx).__name__}; expected an int")
    if not 0 <= layer_idx < len(modules):
        raise ValueError(f"layer_idx={layer_idx} is out of range; expected 0 <= layer_idx < {len(modules)}")
    if config is not None and not isinstance(config, FlexPrefillConfig):
        raise TypeError(
            f"config={config!r:.80} has type {type(config).__name__}; expected a FlexPrefillConfig or None"
        )
    base = layer_config(modules[layer_idx]) if config is None else config
    record.set(modules[layer_idx], CONFIG_ATTRIBUTE, base.replace(**overrides) if overrides else base)


def layer_configs(model: torch.nn.Module) -> tuple[FlexPrefillConfig, ...]:
    """The configuration each layer runs with (patched, or the preset of ``attn_implementation="flexprefill"``).

    ValueError for an unsupported model type, TypeError when ``model`` is not a torch module.
    """
    return tuple(layer_config(m) for m in lookup_model(model).attention_modules(model))


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
