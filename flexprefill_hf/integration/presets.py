"""FlexPrefill presets: YAML files of plain values, validated once, matched to a model by type and name.

A preset file (the packaged ones live in the top-level ``configs/``, installed as ``flexprefill_hf.configs``)::

    description: Yi-9B-200K (paper setting)      # optional, free text
    match:                                       # optional: when the preset applies by itself
      model_types: [llama]                       #   config.model_type must be one of these
      names: [yi-9b-200k]                        #   optional: one of these a substring of name_or_path (any case)
    flexprefill:                                 # FlexPrefillConfig fields; omitted ones keep their defaults
      gamma: 0.9
      tau: 0.1
      block_size: 128
      min_budget: 1024
      max_budget: null
    layers:                                      # optional per-layer overrides, applied in file order
      0: {gamma: 1.0}                            #   one layer
      "28-31": {tau: 0.0}                        #   an inclusive range of layers

Any other key, a value of the wrong type, or a value FlexPrefillConfig rejects (its TypeError included:
``block_size: 128.0``) raises ValueError naming the file and the key.

The ``match`` sections of the packaged presets are the one mechanism that gives a model its preset
(``match_preset``): a preset whose names match the checkpoint wins (the longest matching name); else the
preset that lists the model type without names (at most one per type); else ``default.yaml``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
import re
from typing import Any, Optional, Sequence, Union

import yaml

from ..config import FlexPrefillConfig

PRESET_KEYS = ("description", "match", "flexprefill", "layers")
MATCH_KEYS = ("model_types", "names")
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(FlexPrefillConfig))
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A validated preset.

    Attributes:
        name: the file's stem (``"yi-9b-200k"``).
        source: the file it was read from, for error messages.
        config: the configuration of every layer without an override.
        layer_overrides: ``(first, last, ((field, value), ...))`` in file order; ``last`` inclusive.
        model_types, names: the ``match`` section. No model types: the preset never applies by itself;
            model types without names: it applies to every checkpoint of those types.
        description: free text.
    """

    name: str
    source: str
    config: FlexPrefillConfig
    layer_overrides: tuple[tuple[int, int, tuple[tuple[str, Any], ...]], ...] = ()
    model_types: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    description: str = ""

    def layer_configs(self, num_layers: int) -> tuple[FlexPrefillConfig, ...]:
        """One configuration per layer; ValueError when an override names a layer the model lacks."""
        configs = [self.config] * num_layers
        for first, last, changes in self.layer_overrides:
            if last >= num_layers:
                key = str(first) if first == last else f"{first}-{last}"
                raise ValueError(
                    f"{self.source}: layers.{key}: the model has {num_layers} layers (0-{num_layers - 1})"
                )
            for i in range(first, last + 1):
                configs[i] = configs[i].replace(**dict(changes))
        return tuple(configs)

    def match_rank(self, model_type: Optional[str], name_or_path: str) -> tuple[int, int]:
        """How well the preset fits a checkpoint; (0, 0) when it does not apply, larger is better.

        (2, n): n is the length of the longest of ``names`` found in ``name_or_path``;
        (1, 0): the preset lists ``model_type`` and no names, so it fits the whole family.
        """
        if model_type not in self.model_types:
            return (0, 0)
        if not self.names:
            return (1, 0)
        lowered = (name_or_path or "").lower()
        length = max((len(n) for n in self.names if n.lower() in lowered), default=0)
        return (2, length) if length else (0, 0)


def preset_names() -> tuple[str, ...]:
    """Names of the packaged presets, sorted."""
    root = importlib.resources.files("flexprefill_hf.configs")
    return tuple(sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml")))


def load_preset(name_or_path: Union[str, os.PathLike]) -> Preset:
    """A packaged preset by name (``"qwen2-7b-instruct"``), or a YAML file by path.

    Raises:
        TypeError: ``name_or_path`` is neither a string nor a path.
        ValueError: an unknown name, a missing file, or a bad file (naming the file and the key).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"name_or_path={name_or_path!r:.80} has type {type(name_or_path).__name__}; expected a preset name "
            "or a YAML path"
        )
    text = os.fspath(name_or_path)
    if text in preset_names():
        return _packaged_preset(text)
    if text.endswith((".yaml", ".yml")) or os.path.sep in text or os.path.exists(text):
        if not os.path.isfile(text):
            raise ValueError(f"preset file {text!r} does not exist")
        with open(text, encoding="utf-8") as f:
            return parse_preset(f.read(), source=text)
    raise ValueError(f"unknown preset {text!r}; expected a YAML path or one of: {', '.join(preset_names())}")


def match_preset(
    model_type: Optional[str], name_or_path: str, presets: Optional[Sequence[Preset]] = None
) -> Preset:
    """The preset for a checkpoint: a name match, else its family's preset, else the packaged ``default``.

    Args:
        model_type, name_or_path: ``config.model_type`` and ``config._name_or_path`` of the model.
        presets: the candidates (default: every packaged preset).

    ValueError when two candidates claim the same model type without names (a packaging error).
    """
    if presets is None:
        presets = [_packaged_preset(name) for name in preset_names()]
    ranked = [(preset.match_rank(model_type, name_or_path), preset) for preset in presets]
    family = [preset.source for rank, preset in ranked if rank == (1, 0)]
    if len(family) > 1:
        raise ValueError(
            f"presets {family} all match model_type {model_type!r} without names; expected at most one per model type"
        )
    best = max(ranked, key=lambda item: item[0], default=None)
    return best[1] if best is not None and best[0] > (0, 0) else _packaged_preset("default")


@functools.lru_cache(maxsize=32)
def _packaged_preset(name: str) -> Preset:
    resource = importlib.resources.files("flexprefill_hf.configs") / f"{name}.yaml"
    return parse_preset(resource.read_text(encoding="utf-8"), source=f"configs/{name}.yaml")


def parse_preset(text: str, source: str) -> Preset:
    """Validate the YAML ``text`` of a preset; ``source`` names it in errors and gives its name."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: malformed YAML: {err}") from None
    data = {} if data is None else data
    _expect_mapping(data, source, "the top level")
    _reject_unknown(data, PRESET_KEYS, source, "")

    description = data.get("description") or ""
    if not isinstance(description, str):
        raise ValueError(f"{source}: description: expected text; got {description!r}")

    match = data.get("match") or {}
    _expect_mapping(match, source, "match")
    _reject_unknown(match, MATCH_KEYS, source, "match.")
    model_types = _string_list(match.get("model_types"), source, "match.model_types")
    names = _string_list(match.get("names"), source, "match.names")
    if names and not model_types:
        raise ValueError(
            f"{source}: match.names needs match.model_types: a name matches only checkpoints of the listed model types"
        )

    fields = data.get("flexprefill") or {}
    _expect_mapping(fields, source, "flexprefill")
    _reject_unknown(fields, CONFIG_FIELDS, source, "flexprefill.")
    config = _make_config(FlexPrefillConfig(), fields, source, "flexprefill")

    layers = data.get("layers") or {}
    _expect_mapping(layers, source, "layers")
    overrides = []
    for key, changes in layers.items():
        first, last = _layer_range(key, source)
        where = f"layers.{key}"
        changes = changes or {}
        _expect_mapping(changes, source, where)
        _reject_unknown(changes, CONFIG_FIELDS, source, where + ".")
        _make_config(config, changes, source, where)
        overrides.append((first, last, tuple(changes.items())))

    name = os.path.basename(source)
    for suffix in (".yaml", ".yml"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return Preset(
        name=name,
        source=source,
        config=config,
        layer_overrides=tuple(overrides),
        model_types=model_types,
        names=names,
        description=description,
    )


def _expect_mapping(value: Any, source: str, where: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{source}: {where}: expected a mapping of keys to values; got {value!r:.80}")


def _reject_unknown(mapping: dict, allowed: tuple[str, ...], source: str, prefix: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise ValueError(f"{source}: unknown key {prefix}{key!s}; expected one of: {', '.join(allowed)}")


def _string_list(value: Any, source: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{source}: {where}: expected a list of strings; got {value!r:.80}")
    return tuple(value)


def _make_config(base: FlexPrefillConfig, changes: dict, source: str, where: str) -> FlexPrefillConfig:
    try:
        return base.replace(**changes)
    except (TypeError, ValueError) as err:
        # FlexPrefillConfig's message starts with the field it rejects ("gamma=2 is not supported ...").
        raise ValueError(f"{source}: {where}: {err}") from None


def _layer_range(key: Any, source: str) -> tuple[int, int]:
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key, key
    found = _RANGE.match(key) if isinstance(key, str) else None
    if found is None:
        raise ValueError(
            f"{source}: layers.{key}: expected a layer index >= 0 or an inclusive range 'first-last'"
        )
    first = int(found.group(1))
    last = first if found.group(2) is None else int(found.group(2))
    if first > last:
        raise ValueError(f"{source}: layers.{key}: the range is empty (first > last)")
    return first, last
