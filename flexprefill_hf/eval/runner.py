"""The evaluation loop: in rounds over (method, length, task) cells, per batch of samples a timed prefill,
greedy decoding, RULER's score of the reply, and the teacher-forced score of the expected reply.

Batches are left-padded (with an attention mask and per-row position ids, so a padded row computes what
it would alone). The prefill's statistics (computed fraction, pattern per layer and head) are read right
after it, before the teacher-forced pass runs its own prefill.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import traceback
from typing import Callable, Optional, Sequence

import torch

from .methods import (
    EVAL_ATTENTION_NAME,
    Method,
    apply_method,
    register_eval_attention,
    resolved_config,
    set_attention_implementation,
    summarize,
)
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


# Every method decodes with this one attention function (the methods differ in the prefill only): its decode
# branch is dense attention without repeating K/V for GQA and with the padding mask as a [B, K] row, where
# transformers' "sdpa" repeats K/V on every step of a padded batch (3x the cache traffic for SmolLM2).
DECODE_ATTENTION = EVAL_ATTENTION_NAME


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
    # Decode steps run DECODE_ATTENTION whatever the method (every method decodes densely; the methods
    # differ in the prefill only), which also spares the sparse methods' per-call decode overhead.
    implementation = model.config._attn_implementation
    switch = implementation != DECODE_ATTENTION
    if switch:
        register_eval_attention()
        set_attention_implementation(model, DECODE_ATTENTION)
    try:
        for _ in range(max(budgets)):
            tokens = logits.argmax(-1)  # [B]
            for b, token in enumerate(tokens.tolist()):
                if not done[b]:
                    if token in stops or len(generated[b]) >= budgets[b]:
                        done[b] = True
                    else:
                        generated[b].append(token)
            # Stop as soon as every row has ended its turn or used its budget.
            if all(done) or all(len(g) >= n for g, n in zip(generated, budgets)):
                break
            mask = torch.cat([mask, mask.new_ones(len(samples), 1)], dim=1)
            logits = model(
                input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position, use_cache=True, **cache
            ).logits[:, -1]
            next_position = next_position + 1
    finally:
        if switch:
            set_attention_implementation(model, implementation)
    replies = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    return replies, seconds, stats, layers


SampleSource = Callable[[str, int, int, int], Sequence[Sample]]
"""(task, length, start, count) -> the samples of indices start .. start + count - 1 of that task and length."""


@dataclasses.dataclass
class Evaluation:
    """What :func:`evaluate` ran.

    records: one dict per (method, sample) in the order they ran; heatmaps: one per method (its first batch);
    samples_per_cell: the planned samples per (task, length, method); round_size: samples per cell per round;
    stopped_at_budget: True if the time budget stopped the run before the plan was done; seconds: from the
    start given to :func:`evaluate` to the end of the last batch; matched: {method label: {length: share}},
    the share each ``fraction=match`` baseline ran with; notes: what was skipped, and why; failures: the
    methods (or sample generators) that raised, each dropped at that length for the rest of the run (the
    others go on).
    """

    records: list[dict]
    heatmaps: list[Heatmap]
    samples_per_cell: int
    round_size: int
    stopped_at_budget: bool = False
    seconds: float = 0.0
    matched: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)


def evaluate(
    model,
    tokenizer,
    methods: Sequence[Method],
    samples: SampleSource,
    *,
    lengths: Sequence[int],
    tasks: Sequence[str],
    samples_per_cell: int,
    round_size: Optional[int] = None,
    batch_size: int = 1,
    time_budget: Optional[float] = None,
    start_time: Optional[float] = None,
    on_record: Optional[Callable[[dict], None]] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> Evaluation:
    """Every method on ``samples_per_cell`` samples of every (task, length), in rounds.

    Order (so that a run stopped by ``time_budget`` has balanced coverage): round r takes samples
    r * round_size .. (r + 1) * round_size - 1 of every cell; inside a round, methods in the given order
    (their priority), then lengths in the given order; one (round, method, length) group holds the round's
    samples of all ``tasks`` (task order) and runs in batches of ``batch_size`` (a batch may mix tasks of
    one length: their prompts differ by at most the answer budgets, so padding is small). Samples are
    built on first use (``samples(task, length, start, count)``), so an unfinished plan costs no sizing.

    ``fraction=match`` baselines run at each length with the mean computed share that the reference
    (:func:`~flexprefill_hf.eval.methods.match_reference`: the first ``flexprefill`` method, which must
    come earlier) measured at that length in its first round -- fixed from then on, and recorded in each
    record's config as ``matched_fraction``. At a length where the reference measured nothing the
    baseline is skipped (a note says so).

    ``time_budget`` (seconds, counted from ``start_time``, a ``time.perf_counter()`` value; default now):
    a batch starts only if the time spent plus its expected duration (the last batch of the same method
    and length; 0 when none ran yet) fits in the budget; the first batch always runs. The run then stops:
    ``stopped_at_budget`` tells, and the records hold what ran (cells with fewer samples than planned).

    A method that raises at a length is left out at that length from then on, as is a task whose samples
    cannot be built there; the traceback goes to stderr, ``failures`` says what, and the rest goes on.
    A batch that runs out of GPU memory runs again as two halves.

    ``on_record`` is called with each record as soon as it exists (the CLI writes JSON lines);
    ``progress`` with the number of samples just finished.
    """
    from .methods import is_matched, match_reference

    methods = list(methods)
    round_size = samples_per_cell if round_size is None else round_size
    if round_size < 1 or samples_per_cell < 1:
        raise ValueError(f"samples_per_cell={samples_per_cell}, round_size={round_size}; expected ints >= 1")
    if time_budget is not None and time_budget < 0:
        raise ValueError(f"time_budget={time_budget}; expected seconds >= 0 or None")
    reference = match_reference(methods)
    start_time = time.perf_counter() if start_time is None else start_time
    result = Evaluation([], [], samples_per_cell, round_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    built: dict[tuple[str, int], list[Sample]] = {}
    last_duration: dict[tuple[str, int], float] = {}
    failed: set[tuple[str, int]] = set()  # (method label or task, length) cells left out after an error
    rounds = -(-samples_per_cell // round_size)

    def group_samples(length: int, first: int, stop: int) -> list[Sample]:
        group = []
        for task in tasks:
            if (task, length) in failed:
                continue
            have = built.setdefault((task, length), [])
            try:
                if len(have) < stop:
                    have.extend(samples(task, length, len(have), stop - len(have)))
            except Exception as error:  # noqa: BLE001 -- a broken generator must not lose the other tasks
                traceback.print_exc()
                failed.add((task, length))
                result.failures.append(
                    f"building the samples of {task} at {length} tokens failed; the task is left out at that length: "
                    f"{type(error).__name__}: {error}"
                )
                continue
            group.extend(have[first:stop])
        return group

    def out_of_time(key: tuple[str, int]) -> bool:
        if time_budget is None or not result.records:
            return False
        return time.perf_counter() - start_time + last_duration.get(key, 0.0) > time_budget

    def run_rounds() -> None:
        for round_index in range(rounds):
            if run_round(round_index):
                return

    def run_round(round_index: int) -> bool:
        """One round; True when the time budget stopped the run."""
        first, stop = round_index * round_size, min((round_index + 1) * round_size, samples_per_cell)
        for method in methods:
            for length in lengths:
                key = (method.label, length)
                if key in failed:
                    continue
                if out_of_time(key):
                    result.stopped_at_budget = True
                    return True
                fraction = None
                if is_matched(method):
                    fraction = result.matched.get(method.label, {}).get(length)
                    if fraction is None:
                        shares = [
                            r["computed_fraction"] for r in result.records
                            if r["method"] == reference.label and r["length"] == length
                        ]
                        if not shares:
                            note = f"{method.label} at {length}: skipped, {reference.label} measured nothing there"
                            if note not in result.notes:
                                result.notes.append(note)
                            continue
                        fraction = sum(shares) / len(shares)
                        result.matched.setdefault(method.label, {})[length] = fraction
                began = time.perf_counter()
                group = group_samples(length, first, stop)
                if not group:
                    continue
                try:
                    with apply_method(model, method, fraction) as recorder:
                        config = resolved_config(model, method)
                        if fraction is not None:
                            config["matched_fraction"] = fraction
                        for offset in range(0, len(group), batch_size):
                            if offset and out_of_time(key):
                                result.stopped_at_budget = True
                                break
                            batch = group[offset : offset + batch_size]
                            _run_batch(
                                model, tokenizer, method, config, batch, recorder, pad, round_index, result, on_record
                            )
                            last_duration[key] = time.perf_counter() - began
                            began = time.perf_counter()
                            if progress is not None:
                                progress(len(batch))
                except Exception as error:  # noqa: BLE001 -- one broken method must not lose the others' results
                    # Loud, not silent: the traceback on stderr, a note in results.md, the CLI's exit status 1.
                    traceback.print_exc()
                    failed.add(key)
                    result.failures.append(
                        f"{method.label} failed at {length} tokens (round {round_index}) and was dropped at that length "
                        f"for the rest of the run: {type(error).__name__}: {error}"
                    )
                if result.stopped_at_budget:
                    return True
        return False

    try:
        run_rounds()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the CLI's handler: keep what ran
        result.failures.append(f"interrupted after {time.perf_counter() - start_time:.1f} s; the outputs hold what ran")
    result.seconds = time.perf_counter() - start_time
    return result


def _run_batch(model, tokenizer, method, config, batch, recorder, pad, round_index, result, on_record) -> None:
    """One batch: prefill and greedy replies, then the teacher-forced pass; its records into ``result``.

    A batch that runs out of GPU memory runs again as two halves (each row computes what it computes
    alone, so the results are the same; the records' batch_size says what ran).
    """
    try:
        _run_whole_batch(model, tokenizer, method, config, batch, recorder, pad, round_index, result, on_record)
    except torch.cuda.OutOfMemoryError:
        if len(batch) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(batch) // 2
        print(f"{method.label}: out of GPU memory at batch {len(batch)}; running halves of {half}", file=sys.stderr)
        for part in (batch[:half], batch[half:]):
            _run_batch(model, tokenizer, method, config, part, recorder, pad, round_index, result, on_record)


def _run_whole_batch(model, tokenizer, method, config, batch, recorder, pad, round_index, result, on_record) -> None:
    begin = time.perf_counter()
    replies, seconds, stats, layers = prefill_and_generate(model, tokenizer, batch, recorder)
    generated = time.perf_counter()
    if not any(h.method == method.label for h in result.heatmaps):
        result.heatmaps.append(_heatmap(model, method, batch[0], layers))
    strict = teacher_forced_score(model, [s.prompt_ids for s in batch], [s.target_ids for s in batch], pad)
    # Where a batch's time goes (the log of a long run; the records keep the prefill time only).
    print(f"batch: {method.label} {batch[0].length} x{len(batch)}: prefill {seconds:.2f} s, decode "
          f"{generated - begin - seconds:.2f} s, strict pass {time.perf_counter() - generated:.2f} s", file=sys.stderr)
    for sample, reply, stat, tf in zip(batch, replies, stats, strict):
        record = {
            "task": sample.task,
            "length": sample.length,
            "index": sample.index,
            "seed": sample.seed,
            "round": round_index,
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
        result.records.append(record)
        if on_record is not None:
            on_record(record)


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
