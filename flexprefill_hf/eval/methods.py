"""The attention methods the suite compares, all run through the library's own block-sparse attention.

A method is named on the command line as ``name`` or ``name:key=value,key=value``; a value ``a|b|c``
expands into one method per value (a sweep)::

    dense                                   torch SDPA (transformers' "sdpa"), the reference
    flexprefill[:preset=NAME,gamma=..,...]  FlexPrefill; the model's preset, any FlexPrefillConfig field
    flexprefill_vs_only[:...]               FlexPrefill with tau = 0: every head vertical-slash
    flexprefill_qa_only[:...]               FlexPrefill with tau = 1e9: every head query-aware
    streaming[:sink=128,window=1024,block_size=128]
                                            StreamingLLM-style: the first ``sink`` tokens and a local
                                            window of ``window`` tokens, in whole blocks
    vertical_slash[:vertical=8,slash=8,block_size=128]
                                            MInference-style: per head, the ``vertical`` key blocks and
                                            the ``slash`` diagonal-offset blocks of highest score in the
                                            representative queries' attention (ops/README.md §1, §3),
                                            a fixed budget instead of FlexPrefill's coverage rule
    streaming:fraction=0.3, vertical_slash:fraction=0.3
                                            the budget from a target share of the causal blocks, per
                                            prompt length (to match FlexPrefill's measured share): the
                                            narrowest window that reaches it, or per head the smallest
                                            equal vertical and slash budgets that reach it
    streaming:fraction=match, vertical_slash:fraction=match
                                            the target share is, at each length, the mean computed share
                                            that the run's first ``flexprefill`` method (see
                                            :func:`match_reference`) measured at that length in its first
                                            round; that method must come earlier in the list

FlexPrefill methods use :func:`flexprefill_hf.patch_model`; the two baselines use an attention function
registered with transformers as "flexprefill_eval" (with the same mask function as "flexprefill"), which
builds a :class:`BlockStructure` and calls ``block_sparse_attention_triton`` on CUDA (fp16/bf16) or
``block_sparse_attention_torch`` elsewhere -- the kernels FlexPrefill itself runs. Every method except
``dense`` sets ``cuda_dense_below = 0`` unless told otherwise: at the suite's lengths (2K-8K) the
operator would otherwise route every prompt to dense attention on CUDA and the suite would measure
dense attention twice. Decode steps (one query) always run dense, for every method through the one
attention function ``runner.DECODE_ATTENTION`` (this module's, whose decode branch is
``ops.backends.decode_attention``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
from typing import Any, Iterator, Optional, Union

import torch

from ..config import FlexPrefillConfig
from ..ops.block_structure import block_mask_to_structure
from ..ops.grid import BlockGrid, causal_block_counts

EVAL_ATTENTION_NAME = "flexprefill_eval"
# Set on attention modules while a baseline runs: its pattern, and the recorder of its statistics.
PATTERN_ATTRIBUTE = "flexprefill_eval_pattern"
RECORDER_ATTRIBUTE = "flexprefill_eval_recorder"
QA_ONLY_TAU = 1e9
# fraction=match: the share is measured by the run's reference FlexPrefill method (match_reference).
MATCH = "match"

# Pattern codes of the heatmap: what each (layer, head) computed.
DENSE, VERTICAL_SLASH, QUERY_AWARE, STREAMING = 0, 1, 2, 3
PATTERN_NAMES = {DENSE: "dense", VERTICAL_SLASH: "vertical-slash", QUERY_AWARE: "query-aware", STREAMING: "streaming"}

_FLEX_KINDS = ("flexprefill", "flexprefill_vs_only", "flexprefill_qa_only")
_CONFIG_FIELDS = {f.name: f.type for f in dataclasses.fields(FlexPrefillConfig)}
_INT_FIELDS = ("block_size", "min_budget", "max_budget", "dense_threshold", "cuda_dense_below")
_BASELINE_PARAMS = {
    "streaming": {"sink": 128, "window": 1024, "block_size": 128},
    "vertical_slash": {"vertical": 8, "slash": 8, "block_size": 128},
}
# Given a target share, these budgets come from it.
_FRACTION_REPLACES = {"streaming": ("window",), "vertical_slash": ("vertical", "slash")}
METHOD_KINDS = ("dense",) + _FLEX_KINDS + tuple(_BASELINE_PARAMS)


@dataclasses.dataclass(frozen=True)
class Method:
    """One method with its parameters (after sweep expansion). ``params``: sorted (name, value) pairs."""

    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """``kind`` or ``kind[k=v,...]``: the method's name in tables and plots."""
        if not self.params:
            return self.kind
        return f"{self.kind}[{','.join(f'{k}={v}' for k, v in self.params)}]"

    @property
    def config(self) -> dict:
        """The parameters as given, plus the baselines' defaults: what the JSON lines record."""
        defaults = dict(_BASELINE_PARAMS.get(self.kind, {}))
        if "fraction" in dict(self.params):
            for key in _FRACTION_REPLACES[self.kind]:
                defaults.pop(key)
        defaults.update(self.params)
        return defaults


def parse_methods(specs: list[str]) -> list[Method]:
    """Methods from command-line specs (see the module docstring); ValueError names a bad spec."""
    methods: list[Method] = []
    for spec in specs:
        kind, _, rest = spec.partition(":")
        kind = kind.strip()
        if kind not in METHOD_KINDS:
            raise ValueError(f"method {spec!r}: {kind!r} is not supported; expected one of {', '.join(METHOD_KINDS)}")
        choices: list[tuple[str, list[Any]]] = []
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"method {spec!r}: {item!r} is not key=value")
            key = key.strip()
            choices.append((key, [_parse_value(kind, key, v.strip(), spec) for v in value.split("|")]))
        keys = [k for k, _ in choices]
        if len(set(keys)) != len(keys):
            raise ValueError(f"method {spec!r} names a parameter twice")
        for values in itertools.product(*(v for _, v in choices)):
            method = Method(kind, tuple(sorted(zip(keys, values))))
            _check_method(method, spec)
            if method not in methods:
                methods.append(method)
    return methods


def _parse_value(kind: str, key: str, text: str, spec: str):
    if kind == "dense":
        raise ValueError(f"method {spec!r}: dense takes no parameters")
    if kind in _FLEX_KINDS:
        if key == "preset":
            return text
        if key not in _CONFIG_FIELDS:
            raise ValueError(
                f"method {spec!r}: {key!r} is not a FlexPrefillConfig field; expected preset or one of "
                f"{', '.join(_CONFIG_FIELDS)}"
            )
        if key == "tau" and kind != "flexprefill":
            raise ValueError(f"method {spec!r}: {kind} fixes tau; use flexprefill:tau=... instead")
        if text.lower() == "none" and key in ("max_budget", "dense_threshold"):
            return None
        return _number(key, text, spec, integer=key in _INT_FIELDS)
    allowed = tuple(_BASELINE_PARAMS[kind]) + ("fraction",)
    if key not in allowed:
        raise ValueError(f"method {spec!r}: {key!r} is not a {kind} parameter; expected one of {', '.join(allowed)}")
    if key == "fraction" and text.lower() == MATCH:
        return MATCH
    return _number(key, text, spec, integer=key != "fraction")


def _number(key: str, text: str, spec: str, integer: bool):
    try:
        return int(text) if integer else float(text)
    except ValueError:
        expected = "an int" if integer else "a number"
        raise ValueError(f"method {spec!r}: {key}={text!r} is not {expected}") from None


def _check_method(method: Method, spec: str) -> None:
    """Validate now, before any model is loaded: the config builds, the budgets are positive."""
    params = dict(method.params)
    if method.kind in _FLEX_KINDS:
        fields = {k: v for k, v in params.items() if k != "preset"}
        try:
            FlexPrefillConfig(**fields)
        except (TypeError, ValueError) as error:
            raise ValueError(f"method {spec!r}: {error}") from None
        if "preset" in params:
            from ..integration import preset_names

            if params["preset"] not in preset_names():
                raise ValueError(
                    f"method {spec!r}: preset={params['preset']!r} is not known; expected one of {', '.join(preset_names())}"
                )
    elif method.kind in _BASELINE_PARAMS:
        values = method.config
        if values["block_size"] not in (64, 128):
            raise ValueError(f"method {spec!r}: block_size={values['block_size']} is not supported; expected 64 or 128")
        if "fraction" in values:
            clash = [k for k in _FRACTION_REPLACES[method.kind] if k in params]
            if clash:
                raise ValueError(f"method {spec!r}: fraction sets {', '.join(clash)}; give one or the other")
            if values["fraction"] != MATCH and not 0 < values["fraction"] <= 1:
                raise ValueError(f"method {spec!r}: fraction={values['fraction']} is not supported; expected 0 < fraction <= 1")
        for key, value in values.items():
            minimum = 1 if key in ("window", "block_size") else 0
            if key != "fraction" and value < minimum:
                raise ValueError(f"method {spec!r}: {key}={value} is not supported; expected an int >= {minimum}")


@dataclasses.dataclass(frozen=True)
class StreamingPattern:
    """Attention sink + local window: query block i computes key blocks [sink, sink + s) and (i - w, i]."""

    sink_blocks: int
    window_blocks: Optional[int]
    block_size: int
    fraction: Optional[float] = None  # when set, the window comes from it (window_blocks is None)
    code: int = STREAMING

    def window(self, grid: BlockGrid) -> int:
        """Window in blocks: as given, or the narrowest whose share of the causal blocks reaches ``fraction``."""
        if self.fraction is None:
            return self.window_blocks
        return _streaming_window(grid.num_blocks, grid.first_query_block, self.sink_blocks, self.fraction)

    def block_mask(self, q, k, grid: BlockGrid, softmax_scale: float, sink: torch.Tensor, key_start) -> torch.Tensor:
        """bool [B, Hq, nqb, nb] (the caller adds the diagonal and applies the causal and padding limits).

        q [B, N, Hq, D], k [B, K, Hkv, D]; sink: int64 [B], the first real key block of each sequence;
        key_start: int [B] or None (no padding).
        """
        batch, heads = q.shape[0], q.shape[2]
        j = torch.arange(grid.num_blocks, device=q.device)
        i = torch.arange(grid.first_query_block, grid.num_blocks, device=q.device)
        local = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - self.window(grid))  # [nqb, nb]
        sinks = (j[None, :] >= sink[:, None]) & (j[None, :] < sink[:, None] + self.sink_blocks)  # [B, nb]
        mask = local[None] | sinks[:, None, :]  # [B, nqb, nb]
        return mask[:, None].expand(batch, heads, -1, -1)


@dataclasses.dataclass(frozen=True)
class VerticalSlashPattern:
    """Fixed budgets of vertical (key) and slash (offset) blocks per head, from the representative scores."""

    vertical_blocks: Optional[int]
    slash_blocks: Optional[int]
    block_size: int
    fraction: Optional[float] = None  # when set, per head the smallest equal budgets that reach it
    code: int = VERTICAL_SLASH

    def block_mask(self, q, k, grid: BlockGrid, softmax_scale: float, sink: torch.Tensor, key_start) -> torch.Tensor:
        """bool [B, Hq, nqb, nb] with the diagonal and the limits applied; arguments as
        :meth:`StreamingPattern.block_mask`."""
        from ..ops.selection.scores import pool_key_blocks, pool_offset_blocks, representative_scores

        nb = grid.num_blocks
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from ..ops.selection.scores_triton import representative_scores_triton

            a_v, a_s = representative_scores_triton(q, k, grid, softmax_scale, key_start)
        else:
            valid = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool, device=q.device)
            if key_start is not None:
                valid = torch.arange(k.shape[1], device=q.device)[None, :] >= key_start[:, None]
            a_v, a_s = representative_scores(q, k, grid, softmax_scale, valid)
        j = torch.arange(nb, device=q.device)
        vertical_scores = pool_key_blocks(a_v, grid).masked_fill((j[None, :] < sink[:, None])[:, None, :], -1.0)
        vertical_rank = _rank(vertical_scores)  # [B, Hq, nb]: 0 = the best key block
        slash_rank = _rank(pool_offset_blocks(a_s, grid))  # by offset block
        i = torch.arange(grid.first_query_block, nb, device=q.device)
        offset = (i[:, None] - j[None, :]).clamp_min(0)  # [nqb, nb]
        always, allowed = _limits(grid, sink)

        def mask_of(vertical_budget: torch.Tensor, slash_budget: torch.Tensor) -> torch.Tensor:
            vertical = vertical_rank < vertical_budget[..., None]  # [B, Hq, nb]
            slash = slash_rank < slash_budget[..., None]
            return ((vertical[:, :, None, :] | slash[:, :, offset]) | always) & allowed

        shape = vertical_rank.shape[:2]
        if self.fraction is None:
            budget = torch.full(shape, self.vertical_blocks, device=q.device)
            return mask_of(budget, torch.full(shape, self.slash_blocks, device=q.device))
        # Per head, the smallest k (vertical = slash = k) whose block count reaches the target: the count
        # grows with k, so a binary search of fixed length, all heads at once (no host sync).
        target = self.fraction * causal_block_counts(grid, sink).double()[:, None] - 1e-9  # [B, 1]
        low = torch.zeros(shape, dtype=torch.long, device=q.device)
        high = torch.full(shape, nb, dtype=torch.long, device=q.device)  # k = nb computes every block
        for _ in range(max(1, nb.bit_length())):
            middle = (low + high) // 2
            reached = mask_of(middle, middle).sum((-1, -2)) >= target
            high = torch.where(reached, middle, high)
            low = torch.where(reached, low, middle + 1)
        return mask_of(high, high)


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """int64, same shape: the position of each entry when its row is sorted descending (ties: lower index first)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def _limits(grid: BlockGrid, sink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, 1, nqb, nb] each: the blocks every pattern computes (the diagonal, the sink block) and
    the blocks any pattern may compute (causal, at or after the sink block)."""
    j = torch.arange(grid.num_blocks, device=sink.device)
    i = torch.arange(grid.first_query_block, grid.num_blocks, device=sink.device)
    diagonal = (j[None, :] == i[:, None])[None, None]
    always = diagonal | (j == sink[:, None])[:, None, None, :]
    allowed = (j[None, :] <= i[:, None])[None, None] & (j >= sink[:, None])[:, None, None, :]
    return always, allowed


def _causal_pairs(num_blocks: int, first: int) -> int:
    """Block-causal pairs of the present query blocks first..nb-1 (no padding)."""
    return sum(i + 1 for i in range(first, num_blocks))


@functools.lru_cache(maxsize=256)
def _streaming_window(num_blocks: int, first: int, sink_blocks: int, fraction: float) -> int:
    """The narrowest window (blocks) whose streaming pattern computes >= fraction of the causal pairs
    (no padding: sink block 0). Pure integer arithmetic on the grid, once per shape."""
    target = fraction * _causal_pairs(num_blocks, first)
    for window in range(1, num_blocks + 1):
        # Row i computes its window (i - w, i] and the sink blocks before it.
        count = sum(min(i + 1, window) + min(sink_blocks, max(0, i + 1 - window)) for i in range(first, num_blocks))
        if count >= target - 1e-9:
            return window
    return num_blocks


def is_matched(method: Method) -> bool:
    """True for a baseline whose share comes from the reference method (``fraction=match``)."""
    return dict(method.params).get("fraction") == MATCH


def match_reference(methods: list[Method]) -> Optional[Method]:
    """The method whose measured share ``fraction=match`` baselines reach: the first of kind
    ``flexprefill`` (not an ablation) in ``methods``; None if there is none.

    ValueError if a matched baseline has no reference or comes before it: the runner measures the
    reference's share at each length before any matched baseline runs at that length.
    """
    reference = next((m for m in methods if m.kind == "flexprefill"), None)
    for position, method in enumerate(methods):
        if not is_matched(method):
            continue
        if reference is None:
            raise ValueError(
                f"--methods: {method.label} reaches the computed share of a flexprefill method, but none is given; "
                "add one (e.g. flexprefill, the preset) before it"
            )
        if methods.index(reference) > position:
            raise ValueError(
                f"--methods: {method.label} comes before {reference.label}, whose computed share it reaches; "
                f"put {reference.label} first"
            )
    return reference


def _pattern(method: Method, matched_fraction: Optional[float] = None):
    values = method.config
    bs = values["block_size"]
    fraction = values.get("fraction")
    if fraction == MATCH:
        if matched_fraction is None or not 0 < matched_fraction <= 1:
            raise ValueError(
                f"{method.label}: matched_fraction={matched_fraction!r}; expected the reference's measured share, "
                "0 < share <= 1"
            )
        fraction = matched_fraction
    if method.kind == "streaming":
        window = None if fraction is not None else math.ceil(values["window"] / bs)
        return StreamingPattern(math.ceil(values["sink"] / bs), window, bs, fraction)
    if fraction is not None:
        return VerticalSlashPattern(None, None, bs, fraction)
    return VerticalSlashPattern(values["vertical"], values["slash"], bs)


@dataclasses.dataclass
class LayerStats:
    """What one layer computed in the last prefill: fraction of the causal blocks and pattern, [B, Hq] each."""

    computed_fraction: torch.Tensor
    pattern: torch.Tensor


class Recorder:
    """Per-layer :class:`LayerStats` of the last prefill of a baseline (None for a layer that recorded nothing)."""

    def __init__(self, num_layers: int) -> None:
        self.layers: list[Optional[LayerStats]] = [None] * num_layers

    def record(self, layer_idx: int, stats: LayerStats) -> None:
        self.layers[layer_idx] = stats

    def layer_stats(self) -> list[Optional[LayerStats]]:
        return list(self.layers)


class FlexRecorder:
    """The statistics ``flexprefill_hf.record_stats`` records, read as :class:`LayerStats`."""

    def __init__(self, stats_recorder) -> None:
        self._recorder = stats_recorder

    def layer_stats(self) -> list[Optional[LayerStats]]:
        out = []
        for s in self._recorder.stats:
            if s is None:  # the layer ran the dense fallback outside the operator
                out.append(None)
                continue
            code = torch.where(s.query_aware, QUERY_AWARE, VERTICAL_SLASH).to(torch.int8)
            if s.dense:
                code = torch.full_like(code, DENSE)
            out.append(LayerStats(s.computed_fraction.float(), code))
        return out


def eval_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function contract for the baselines: (out [B, N, Hq, D], None).

    query [B, Hq, N, D], key/value [B, Hkv, K, D]; attention_mask None or the bool [B, K] padding mask of
    ``flexprefill_mask``. A prefill computes the module's pattern's blocks (always the diagonal block and
    never a block before the sequence's first real key), or runs dense on a module without a pattern; a
    decode step (one query row) runs dense, by ``ops.backends.decode_attention``.
    """
    from ..integration import dense_attention_forward

    pattern = module.__dict__.get(PATTERN_ATTRIBUTE)
    if query.shape[2] == 1 and (attention_mask is None or attention_mask.dim() == 2):
        # Every method's decode steps (runner.DECODE_ATTENTION): GQA without repeating K/V, the padding mask as
        # one [B, K] row (transformers' sdpa repeats K/V whenever a mask is given).
        from ..ops.backends import decode_attention

        return decode_attention(query, key, value, scaling, key_mask=attention_mask).transpose(1, 2), None
    if pattern is None:
        return dense_attention_forward(query, key, value, attention_mask, scaling=scaling)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"the {EVAL_ATTENTION_NAME} attention got a {attention_mask.dim()}-D mask; the suite only builds "
            "left-padded batches (a 2-D padding mask)"
        )
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, N, H, D]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scaling is None else float(scaling)
    q_len, k_len = q.shape[1], k.shape[1]
    key_start = None
    if attention_mask is not None:
        key_start = (k_len - attention_mask.sum(-1, dtype=torch.int32)).to(q.device)
    grid = BlockGrid(q_len, k_len, pattern.block_size)
    starts = torch.zeros(q.shape[0], dtype=torch.long, device=q.device) if key_start is None else key_start.long()
    sink = (starts.clamp(max=k_len - 1) + grid.pad) // grid.block_size  # [B]
    always, allowed = _limits(grid, sink)
    mask = (pattern.block_mask(q, k, grid, scale, sink, key_start) | always) & allowed  # [B, Hq, nqb, nb]
    structure = block_mask_to_structure(mask, grid)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from ..ops.attention.block_sparse_triton import block_sparse_attention_triton

        out = block_sparse_attention_triton(q, k, v, structure, softmax_scale=scale, key_start=key_start)
    else:
        from ..ops.attention.block_sparse_torch import block_sparse_attention_torch

        out = block_sparse_attention_torch(q, k, v, structure, scale, key_start)
    recorder = module.__dict__.get(RECORDER_ATTRIBUTE)
    if recorder is not None:
        computed = structure.counts.sum(-1, dtype=torch.int32)  # [B, Hq]
        fraction = computed.float() / causal_block_counts(grid, sink).clamp_min(1)[:, None].float()
        recorder.record(module.layer_idx, LayerStats(fraction, torch.full_like(computed, pattern.code, dtype=torch.int8)))
    return out, None


def register_eval_attention() -> None:
    """Register the baselines' attention function and the FlexPrefill mask function as "flexprefill_eval"."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from ..integration import flexprefill_mask

    AttentionInterface.register(EVAL_ATTENTION_NAME, eval_attention_forward)
    AttentionMaskInterface.register(EVAL_ATTENTION_NAME, flexprefill_mask)


def _attention_modules(model) -> list:
    from flexprefill_hf.patches import lookup

    return lookup(getattr(model.config, "model_type", None)).attention_modules(model)


def set_attention_implementation(model, name: str) -> None:
    """Make ``model`` run the attention function registered as ``name`` (transformers 5 and 4.5x)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers 4.5x
        model.config._attn_implementation = name


def flexprefill_config(method: Method) -> tuple[Optional[str], dict]:
    """(preset name or None, FlexPrefillConfig overrides) of a FlexPrefill method."""
    params = dict(method.params)
    preset = params.pop("preset", None)
    params.setdefault("cuda_dense_below", 0)
    if method.kind == "flexprefill_vs_only":
        params["tau"] = 0.0
    elif method.kind == "flexprefill_qa_only":
        params["tau"] = QA_ONLY_TAU
    return preset, params


@contextlib.contextmanager
def apply_method(
    model, method: Method, matched_fraction: Optional[float] = None
) -> Iterator[Optional[Union[Recorder, FlexRecorder]]]:
    """Run ``model`` with ``method`` inside the block; yields what records each prefill's statistics
    (``.layer_stats()``; None for dense). The model is restored afterwards. ``matched_fraction``: the
    target share of a ``fraction=match`` baseline (required for one, ignored otherwise)."""
    import flexprefill_hf

    if method.kind == "dense":
        yield None
        return
    if method.kind in _FLEX_KINDS:
        preset, overrides = flexprefill_config(method)
        flexprefill_hf.patch_model(model, preset, **overrides)
        try:
            with flexprefill_hf.record_stats(model) as stats:
                yield FlexRecorder(stats)
        finally:
            flexprefill_hf.unpatch_model(model)
        return
    modules = _attention_modules(model)
    recorder = Recorder(len(modules))
    register_eval_attention()
    before = model.config._attn_implementation
    pattern = _pattern(method, matched_fraction)
    for module in modules:
        module.__dict__[PATTERN_ATTRIBUTE] = pattern
        module.__dict__[RECORDER_ATTRIBUTE] = recorder
    set_attention_implementation(model, EVAL_ATTENTION_NAME)
    try:
        yield recorder
    finally:
        set_attention_implementation(model, before)
        for module in modules:
            module.__dict__.pop(PATTERN_ATTRIBUTE, None)
            module.__dict__.pop(RECORDER_ATTRIBUTE, None)


def resolved_config(model, method: Method) -> dict:
    """What the method ran with, for the records: its parameters and, for FlexPrefill methods (call it
    inside :func:`apply_method`), the FlexPrefillConfig of layer 0 and whether other layers differ."""
    config = dict(method.config)
    if method.kind in _FLEX_KINDS:
        import flexprefill_hf

        layers = flexprefill_hf.layer_configs(model)
        config["resolved"] = dataclasses.asdict(layers[0])
        config["layers_differ"] = any(c != layers[0] for c in layers)
    return config


def summarize(layers: list[Optional[LayerStats]], batch: int) -> list[dict]:
    """Per sample of the batch: mean computed fraction over layers and heads (a layer that recorded
    nothing ran dense: 1), and the share of query-aware heads."""
    fractions, query_aware = [], []
    for stats in layers:
        if stats is None:
            fractions.append(torch.ones(batch))
            query_aware.append(torch.zeros(batch))
        else:
            fractions.append(stats.computed_fraction.float().mean(-1).cpu())
            query_aware.append((stats.pattern == QUERY_AWARE).float().mean(-1).cpu())
    if not fractions:
        return [{"computed_fraction": 1.0, "query_aware_share": 0.0} for _ in range(batch)]
    f = torch.stack(fractions).mean(0)
    qa = torch.stack(query_aware).mean(0)
    return [{"computed_fraction": float(f[b]), "query_aware_share": float(qa[b])} for b in range(batch)]
