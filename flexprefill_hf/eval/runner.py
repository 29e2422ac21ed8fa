"""The evaluation loop: for each method and batch of samples, a timed prefill, greedy decoding, RULER's
score of the reply, and the teacher-forced score of the expected reply.

Batches are left-padded (with an attention mask and per-row position ids, so a padded row computes what
it would alone). The prefill's statistics (computed fraction, pattern per layer and head) are read right
after it, before the teacher-forced pass runs its own prefill.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Optional, Sequence

import torch

from .methods import Method, apply_method, resolved_config, summarize
from .scoring import ruler_score, teacher_forced_score
from .tasks import Sample


@dataclasses.dataclass
class Heatmap:
    """Per-layer, per-head statistics of one prompt under one method: fraction float [L][H], pattern int [L][H]."""

    method: str
    task: str
    length: int
    computed_fraction: list[list[float]]
    pattern: list[list[int]]


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int):
    """ids, attention mask and position ids, int64 [B, W], for token rows padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[b, width - len(row) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-turn ids: the tokenizer's EOS and those of the model's generation config."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_and_generate(model, tokenizer, samples: Sequence[Sample], recorder):
    """Greedy replies of a batch. Returns (replies [str], prefill seconds, per-sample stats, layer stats)."""
    from transformers import DynamicCache

    from ..models import cache_kwarg

    device = model.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask, positions = (t.to(device) for t in left_pad([s.prompt_ids for s in samples], pad))
    cache = {cache_kwarg(model): DynamicCache()}
    _synchronize(device)
    start = time.perf_counter()
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **cache
    ).logits[:, -1]
    _synchronize(device)
    seconds = time.perf_counter() - start
    layers = recorder.layer_stats() if recorder is not None else []
    stats = summarize(layers, len(samples))

    stops = stop_token_ids(model, tokenizer)
    budgets = [s.max_new_tokens for s in samples]
    generated: list[list[int]] = [[] for _ in samples]
    done = [False] * len(samples)
    next_position = positions[:, -1:] + 1
    for _ in range(max(budgets)):
        tokens = logits.argmax(-1)  # [B]
        for b, token in enumerate(tokens.tolist()):
            if not done[b]:
                if token in stops or len(generated[b]) >= budgets[b]:
                    done[b] = True
                else:
                    generated[b].append(token)
        if all(done) or all(len(g) >= n for g, n in zip(generated, budgets)):
            break
        mask = torch.cat([mask, mask.new_ones(len(samples), 1)], dim=1)
        logits = model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position, use_cache=True, **cache
        ).logits[:, -1]
        next_position = next_position + 1
    replies = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    return replies, seconds, stats, layers


def evaluate(
    model,
    tokenizer,
    methods: Sequence[Method],
    samples: Sequence[Sample],
    *,
    batch_size: int = 1,
    on_record: Optional[Callable[[dict], None]] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> tuple[list[dict], list[Heatmap]]:
    """Every method on every sample. Returns (one record per (method, sample), one heatmap per method).

    The heatmap is the first sample's layer x head statistics (for dense: all 1, pattern dense).
    ``on_record`` is called with each record as soon as it exists (the CLI writes JSON lines);
    ``progress`` with the number of samples just finished.
    """
    records, heatmaps = [], []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for method in methods:
        with apply_method(model, method) as recorder:
            config = resolved_config(model, method)
            for batch in _batches(samples, batch_size):
                replies, seconds, stats, layers = prefill_and_generate(model, tokenizer, batch, recorder)
                if not any(h.method == method.label for h in heatmaps):
                    heatmaps.append(_heatmap(model, method, batch[0], layers))
                strict = teacher_forced_score(model, [s.prompt_ids for s in batch], [s.target_ids for s in batch], pad)
                for sample, reply, stat, tf in zip(batch, replies, stats, strict):
                    record = {
                        "task": sample.task,
                        "length": sample.length,
                        "index": sample.index,
                        "seed": sample.seed,
                        "method": method.label,
                        "kind": method.kind,
                        "config": config,
                        "prompt_tokens": sample.prompt_tokens,
                        "prompt_hash": sample.prompt_hash,
                        "answers": list(sample.answers),
                        "prediction": reply,
                        "metric": sample.metric,
                        "ruler_score": ruler_score(sample.metric, reply, sample.answers),
                        "strict_log_prob": tf.mean_log_prob,
                        "strict_top1": tf.top1,
                        "target_tokens": tf.tokens,
                        "computed_fraction": stat["computed_fraction"] if recorder is not None else 1.0,
                        "query_aware_share": stat["query_aware_share"],
                        "prefill_s": seconds / len(batch),
                        "batch_size": len(batch),
                    }
                    records.append(record)
                    if on_record is not None:
                        on_record(record)
                if progress is not None:
                    progress(len(batch))
    return records, heatmaps


def _batches(samples: Sequence[Sample], batch_size: int) -> Iterable[list[Sample]]:
    """Batches of one task and length each (similar prompt lengths: little padding), in the given order."""
    groups: dict[tuple[str, int], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.task, s.length), []).append(s)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def _heatmap(model, method: Method, sample: Sample, layers) -> Heatmap:
    from .methods import DENSE

    num_layers = model.config.num_hidden_layers
    heads = model.config.num_attention_heads
    fraction = [[1.0] * heads for _ in range(num_layers)]
    pattern = [[DENSE] * heads for _ in range(num_layers)]
    for layer, stats in enumerate(layers):
        if stats is not None:
            fraction[layer] = stats.computed_fraction[0].float().cpu().tolist()
            pattern[layer] = stats.pattern[0].int().cpu().tolist()
    return Heatmap(method.label, sample.task, sample.length, fraction, pattern)
