"""The suite's run order on a tiny model: rounds over (method, length, task) cells, fraction=match baselines
at the reference's measured share, the time budget (stop, then the outputs of what ran), one failing
method not losing the others. CPU, a few hundred tokens, a handful of samples."""

from __future__ import annotations

import dataclasses
import json
import zlib

import pytest
import torch

from flexprefill_hf.eval import cli, runner
from flexprefill_hf.eval.methods import is_matched, match_reference, parse_methods
from flexprefill_hf.eval.report import coverage_table
from flexprefill_hf.eval.tasks import Draft, Sample

from hf_tiny import SPARSE, VOCAB, tiny_model

FLEX = f"flexprefill:block_size={SPARSE['block_size']},min_budget={SPARSE['min_budget']},gamma=0.5"
STREAMING = "streaming:fraction=match,block_size=64,sink=64"
VERTICAL_SLASH = "vertical_slash:fraction=match,block_size=64"
# Prompt lengths per target length: equal within a length (no padding, so a baseline's share is exact).
PROMPT = {640: 630, 1024: 1000}


class StubTokenizer:
    pad_token_id = 0
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


class SampleSource:
    """Deterministic random samples; remembers every (task, length, start, count) asked for."""

    def __init__(self):
        self.calls = []

    def __call__(self, task, length, start, count):
        self.calls.append((task, length, start, count))
        out = []
        for index in range(start, start + count):
            g = torch.Generator().manual_seed(zlib.crc32(f"{task}/{length}/{index}".encode()))  # not hash(): salted
            prompt = tuple(torch.randint(3, VOCAB, (PROMPT[length],), generator=g).tolist())
            draft = Draft("", "", ("7",), " 7")
            out.append(Sample(task, length, index, 0, draft, prompt, (7, 8), 2, 0))
        return out


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=3)


def _evaluate(model, specs, **kwargs):
    options = dict(lengths=(640, 1024), tasks=("a", "b"), samples_per_cell=2, round_size=1, batch_size=2)
    options.update(kwargs)
    return runner.evaluate(model, StubTokenizer(), parse_methods(specs), SampleSource(), **options)


def test_rounds_priority_and_matched_share(model):
    source = SampleSource()
    methods = parse_methods(["dense", FLEX, STREAMING, VERTICAL_SLASH])
    result = runner.evaluate(
        model, StubTokenizer(), methods, source, lengths=(640, 1024), tasks=("a", "b"), samples_per_cell=2,
        round_size=1, batch_size=2,
    )
    records = result.records
    assert not result.stopped_at_budget and not result.failures and len(records) == 4 * 2 * 2 * 2
    # Round by round; inside a round, methods in the given order, then lengths; each batch mixes the tasks.
    order = [(r["round"], methods.index(next(m for m in methods if m.label == r["method"])), r["length"]) for r in records]
    assert order == sorted(order)
    assert [r["task"] for r in records[:2]] == ["a", "b"] and records[0]["batch_size"] == 2
    # Every sample built once, round by round.
    assert sorted(source.calls) == sorted((t, n, i, 1) for t in "ab" for n in (640, 1024) for i in (0, 1))
    reference = match_reference(methods)
    assert reference == methods[1]
    for method in methods[2:]:
        for length in (640, 1024):
            shares = [r["computed_fraction"] for r in records if r["method"] == reference.label and r["length"] == length]
            first_round = [r["computed_fraction"] for r in records
                           if r["method"] == reference.label and r["length"] == length and r["round"] == 0]
            assert 0 < min(shares) < 1
            matched = result.matched[method.label][length]
            assert matched == pytest.approx(sum(first_round) / len(first_round))
            mine = [r for r in records if r["method"] == method.label and r["length"] == length]
            assert len(mine) == 4 and all(r["config"]["matched_fraction"] == matched for r in mine)
            # The narrowest window / smallest budgets that reach the share: at least it, never all of it.
            assert all(matched - 1e-6 <= r["computed_fraction"] < 1 for r in mine)


@pytest.mark.parametrize("spec", ["dense", FLEX, "streaming:sink=64,window=128,block_size=64"])
def test_decode_steps_run_the_decode_attention_then_the_method_again(model, spec):
    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"].shape[1], model.config._attn_implementation)),
        with_kwargs=True,
    )
    (method,) = parse_methods([spec])
    try:
        with runner.apply_method(model, method) as recorder:
            patched = model.config._attn_implementation
            batch = [dataclasses.replace(s, max_new_tokens=4) for s in SampleSource()("a", 640, 0, 2)]
            replies, _, _, _ = runner.prefill_and_generate(model, StubTokenizer(), batch, recorder)
            assert model.config._attn_implementation == patched
    finally:
        hook.remove()
    # The prefill (630 tokens) with the method, then the decode steps (at most max_new_tokens - 1) with the
    # suite's one decode attention.
    decode = runner.DECODE_ATTENTION
    assert seen[0] == (630, patched) and 2 <= len(seen) <= 4 and all(step == (1, decode) for step in seen[1:])
    assert all(isinstance(r, str) for r in replies)


def test_decode_attention_computes_what_sdpa_computes_on_a_padded_batch(model, monkeypatch):
    """The suite's decode steps (GQA without repeated K/V, the padding mask as a row) against transformers'
    sdpa: the same greedy tokens and, at fp32 rounding, the same logits at every step of a left-padded batch."""
    g = torch.Generator().manual_seed(11)
    lengths = (70, 45, 90)  # unequal: rows 0 and 1 are left-padded
    batch = [
        Sample("a", 128, i, 0, Draft("", "", ("7",), " 7"), tuple(torch.randint(3, VOCAB, (n,), generator=g).tolist()),
               (7, 8), 6, 0)
        for i, n in enumerate(lengths)
    ]
    logits = {}
    for implementation in ("sdpa", runner.DECODE_ATTENTION):
        monkeypatch.setattr(runner, "DECODE_ATTENTION", implementation)
        steps = []
        hook = model.register_forward_hook(lambda module, args, out: steps.append(out.logits[:, -1].clone()))
        try:
            replies, _, _, _ = runner.prefill_and_generate(model, StubTokenizer(), batch, None)
        finally:
            hook.remove()
        assert model.config._attn_implementation == "sdpa"  # dense: the model's own implementation, restored
        logits[implementation] = (replies, torch.stack(steps[1:]))  # the decode steps (steps[0] is the prefill)
    (sdpa_replies, sdpa_logits), (ours_replies, ours_logits) = logits.values()
    assert ours_replies == sdpa_replies and ours_logits.shape == sdpa_logits.shape and len(ours_logits) >= 5
    torch.testing.assert_close(ours_logits, sdpa_logits, rtol=1e-5, atol=1e-5)


def test_zero_budget_runs_one_batch_and_a_large_one_runs_all(model):
    result = _evaluate(model, ["dense", FLEX], time_budget=0.0, batch_size=1)
    assert result.stopped_at_budget and len(result.records) == 1
    assert result.records[0]["method"] == "dense" and result.records[0]["round"] == 0
    result = _evaluate(model, ["dense", FLEX], time_budget=1e6)
    assert not result.stopped_at_budget and len(result.records) == 2 * 2 * 2 * 2


def test_matched_baseline_skipped_where_the_reference_measured_nothing(model, monkeypatch):
    real = runner.prefill_and_generate

    def broken_reference(model, tokenizer, samples, recorder):
        if recorder is not None and type(recorder).__name__ == "FlexRecorder" and samples[0].length == 1024:
            raise RuntimeError("kernel exploded")
        return real(model, tokenizer, samples, recorder)

    monkeypatch.setattr(runner, "prefill_and_generate", broken_reference)
    result = _evaluate(model, ["dense", FLEX, STREAMING], samples_per_cell=1)
    # The reference failed at 1024 and was dropped; dense went on; the baseline ran at 640 only.
    assert len(result.failures) == 1 and "kernel exploded" in result.failures[0] and "at 1024 tokens" in result.failures[0]
    cells = {(r["method"], r["length"]) for r in result.records}
    flex, streaming = parse_methods([FLEX, STREAMING])
    assert cells == {("dense", 640), ("dense", 1024), (flex.label, 640), (streaming.label, 640)}
    assert result.notes == [f"{streaming.label} at 1024: skipped, {flex.label} measured nothing there"]


def test_a_task_whose_samples_fail_is_left_out_at_that_length(model):
    source = SampleSource()

    def flaky(task, length, start, count):
        if task == "b" and length == 1024:
            raise ValueError("sample larger than population")
        return source(task, length, start, count)

    result = runner.evaluate(
        model, StubTokenizer(), parse_methods(["dense"]), flaky, lengths=(640, 1024), tasks=("a", "b"),
        samples_per_cell=2, round_size=1, batch_size=4,
    )
    assert {(r["task"], r["length"]) for r in result.records} == {("a", 640), ("b", 640), ("a", 1024)}
    assert len(result.records) == 6 and len(result.failures) == 1 and "b at 1024 tokens" in result.failures[0]


def test_an_interrupt_keeps_what_ran(model):
    def interrupt(count):
        raise KeyboardInterrupt

    result = _evaluate(model, ["dense", FLEX], progress=interrupt)
    assert len(result.records) == 2 and result.failures[0].startswith("interrupted after")


def test_match_needs_a_flexprefill_method_before_it():
    (method,) = parse_methods(["vertical_slash:fraction=match"])
    assert is_matched(method) and method.config == {"fraction": "match", "block_size": 128}
    with pytest.raises(ValueError, match="none is given"):
        match_reference(parse_methods(["dense", "streaming:fraction=match"]))
    with pytest.raises(ValueError, match="comes before flexprefill"):
        match_reference(parse_methods(["streaming:fraction=match", "flexprefill"]))
    assert match_reference(parse_methods(["flexprefill_vs_only", "flexprefill:gamma=0.9", "flexprefill"])).label == (
        "flexprefill[gamma=0.9]"
    )


def test_coverage_table_counts_per_cell():
    records = [{"method": m, "length": n, "task": t} for m, n, t in [
        ("dense", 1024, "vt"), ("dense", 1024, "vt"), ("dense", 1024, "cwe"), ("dense", 2048, "vt"),
        ("dense", 2048, "cwe"), ("fp", 1024, "vt"),
    ]]
    assert coverage_table(records).splitlines() == [
        "| samples per task | 1024 | 2048 |",
        "|---|---|---|",
        "| dense | 1-2 | 1 |",
        "| fp | 1 (1 of 2 tasks) | 0 |",
    ]


def test_cli_time_budget_writes_the_outputs_and_merge_rebuilds_them(model, tmp_path, monkeypatch):
    source = SampleSource()
    monkeypatch.setattr("flexprefill_hf.models.load_model", lambda *a, **k: (model, StubTokenizer()))
    monkeypatch.setattr(
        "flexprefill_hf.eval.tasks.generate_samples",
        lambda tokenizer, task, length, count, seed=0, start=0: source(task, length, start, count),
    )
    monkeypatch.setattr("flexprefill_hf.eval.cli.TASK_NAMES", ("a", "b"))
    out = tmp_path / "run"
    argv = ["--lengths", "640", "--tasks", "a", "b", "--samples", "4", "--round-size", "2", "--batch-size", "4",
            "--methods", "dense", FLEX, STREAMING, "--time-budget", "0", "--out", str(out), "--no-plots"]
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["method"] for r in records} == {"dense"}  # one batch: round 0 of dense
    info = json.loads((out / "run.json").read_text())
    assert info["coverage"]["stopped_at_budget"] and info["time_budget"] == 0.0
    table = (out / "results.md").read_text()
    assert table.startswith("Planned 4 samples per cell, in rounds of 2.\n\nThe time budget stopped the run")
    assert "| dense | 2 |" in table and "| **average** | 640 | dense | 4 |" in table
    merged = tmp_path / "merged"
    assert cli.main(["--merge", str(out), "--out", str(merged), "--no-plots"]) == 0
    assert (merged / "results.md").read_text() == table
