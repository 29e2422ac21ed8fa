"""``python -m flexprefill_hf.eval`` / ``flexprefill-eval``: the offline RULER suite on a model.

    flexprefill-eval --lengths 2048 4096 --samples 8 --methods dense flexprefill "flexprefill:gamma=0.9"
    flexprefill-eval --device cuda --lengths 2048 4096 8192 --samples 32 --batch-size 8 \\
        --methods dense flexprefill "streaming:window=512|1024" "vertical_slash:vertical=4|8,slash=4|8"
    flexprefill-eval --device cuda --lengths 2048 4096 8192 --samples 32 --round-size 8 --batch-size 88 \\
        --time-budget 280 --methods dense flexprefill "streaming:fraction=match" "vertical_slash:fraction=match"

The work goes in rounds of --round-size samples over every (task, length, method) cell, methods in --methods
order (their priority); --time-budget stops starting batches when the next would not fit and the outputs
are written for what ran (results.md opens with the samples per cell). ``fraction=match`` baselines run
at the share the first ``flexprefill`` method (listed before them) measured at each length in round 0.

Writes into --out: samples.jsonl (one line per sample and method), results.md (the table), heatmaps.json,
run.json (arguments and versions) and, with matplotlib installed, score_vs_fraction.png and
heatmap_<method>.png. Every argument is checked before the model is loaded. ``--merge DIR...`` evaluates
nothing and writes one report of several earlier runs (e.g. one run per method on a time-limited GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .methods import METHOD_KINDS, match_reference, parse_methods
from .tasks import TASK_NAMES

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_METHODS = ("dense", "flexprefill")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexprefill-eval", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="Hugging Face id, folder or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--lengths", nargs="+", default=["4096"], help="target lengths in tokens (4096 or 4K); default 4096")
    parser.add_argument("--tasks", nargs="+", default=["all"], help=f"tasks or 'all': {', '.join(TASK_NAMES)}")
    parser.add_argument("--samples", type=int, default=4, help="samples per task and length (default 4)")
    parser.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHODS),
        help=f"method specs kind[:key=value,...], a|b|c sweeps a value; kinds: {', '.join(METHOD_KINDS)}",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="eval_out", help="output folder (default ./eval_out)")
    parser.add_argument(
        "--batch-size", type=int, default=1,
        help="samples per forward pass, left-padded; a batch may mix the tasks of one length (default 1)",
    )
    parser.add_argument(
        "--round-size", type=int, default=8,
        help="samples per (task, length, method) cell per round: the run goes round by round over all cells, "
        "methods in --methods order (their priority), so a time budget leaves balanced coverage (default 8)",
    )
    parser.add_argument(
        "--time-budget", type=float, default=None, metavar="SECONDS",
        help="stop starting new batches once this many seconds (from the start, model load included) would be "
        "exceeded, then write the outputs for what ran (default: no limit)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    parser.add_argument(
        "--merge", nargs="+", default=None, metavar="DIR",
        help="evaluate nothing: combine the samples.jsonl and heatmaps.json of earlier runs' folders into --out",
    )
    return parser


@dataclasses.dataclass(frozen=True)
class Options:
    model: Optional[str]
    device: str
    dtype: Optional[str]
    lengths: tuple[int, ...]
    tasks: tuple[str, ...]
    samples: int
    methods: tuple
    seed: int
    out: Path
    batch_size: int
    plots: bool
    merge: tuple[Path, ...] = ()
    round_size: int = 8
    time_budget: Optional[float] = None


def parse_length(text: str) -> int:
    """'4096', '4K', '4k' -> 4096; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
    if not match:
        raise ValueError(f"--lengths: {text!r} is not a length; expected an int of tokens like 4096 or 4K")
    value = int(match.group(1)) * (1024 if match.group(2) else 1)
    if value < 256:
        raise ValueError(f"--lengths: {text!r} is too short; expected at least 256 tokens")
    return value


def validate(args: argparse.Namespace) -> Options:
    """Options from parsed arguments; ValueError naming the argument on bad input. Loads nothing."""
    import torch

    lengths = tuple(dict.fromkeys(parse_length(t) for t in args.lengths))
    tasks = list(TASK_NAMES) if [t.lower() for t in args.tasks] == ["all"] else list(dict.fromkeys(args.tasks))
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown:
        raise ValueError(f"--tasks: {unknown} not supported; expected 'all' or some of {', '.join(TASK_NAMES)}")
    if args.samples < 1:
        raise ValueError(f"--samples={args.samples}; expected an int >= 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size}; expected an int >= 1")
    if args.round_size < 1:
        raise ValueError(f"--round-size={args.round_size}; expected an int >= 1")
    if args.time_budget is not None and not args.time_budget >= 0:
        raise ValueError(f"--time-budget={args.time_budget}; expected seconds >= 0")
    methods = parse_methods(args.methods)
    match_reference(methods)  # a fraction=match baseline needs a flexprefill method before it
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"--device={args.device!r} is not a torch device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={args.device!r} but CUDA is not available here")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out={args.out!r} exists and is not a folder")
    if not args.no_plots:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("the plots need matplotlib: `pip install matplotlib`, or pass --no-plots")
    merge = tuple(Path(d) for d in args.merge or ())
    for folder in merge:
        if not (folder / "samples.jsonl").is_file():
            raise ValueError(f"--merge: {str(folder)!r} holds no samples.jsonl")
    return Options(
        model=args.model, device=args.device, dtype=args.dtype, lengths=lengths, tasks=tuple(tasks),
        samples=args.samples, methods=tuple(methods), seed=args.seed, out=out, batch_size=args.batch_size,
        plots=not args.no_plots, merge=merge, round_size=args.round_size, time_budget=args.time_budget,
    )


def run(options: Options, start: Optional[float] = None) -> dict:
    """Load the model, evaluate round by round, write the outputs. Returns the paths written.

    ``start``: the ``time.perf_counter()`` value the time budget counts from (default: now).
    """
    import torch
    from tqdm import tqdm

    from ..models import load_model
    from .runner import evaluate
    from .tasks import generate_samples

    start = time.perf_counter() if start is None else start
    dtype = getattr(torch, options.dtype) if options.dtype else None
    model, tokenizer = load_model(options.model, device=options.device, dtype=dtype)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max(options.lengths) > limit:
        raise ValueError(f"--lengths: {max(options.lengths)} exceeds the model's context of {limit} tokens")
    print(f"loaded {options.model or 'the embedded SmolLM2-135M-Instruct'} in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    def samples(task: str, length: int, first: int, count: int):
        return generate_samples(tokenizer, task, length, count, seed=options.seed, start=first)

    options.out.mkdir(parents=True, exist_ok=True)
    jsonl = options.out / "samples.jsonl"
    total = options.samples * len(options.tasks) * len(options.lengths) * len(options.methods)
    with open(jsonl, "w") as sink, tqdm(total=total, desc="samples", unit="sample", mininterval=5.0) as bar:

        def write(record: dict) -> None:
            sink.write(json.dumps(record, separators=(",", ":")) + "\n")
            sink.flush()
            bar.set_postfix(method=record["method"], length=record["length"], refresh=False)

        # SIGTERM (e.g. `timeout` around a device call) stops the run as Ctrl-C does: the outputs of what ran
        # are still written.
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            evaluation = evaluate(
                model, tokenizer, options.methods, samples, lengths=options.lengths, tasks=options.tasks,
                samples_per_cell=options.samples, round_size=options.round_size, batch_size=options.batch_size,
                time_budget=options.time_budget, start_time=start, on_record=write, progress=bar.update,
            )
        finally:
            signal.signal(signal.SIGTERM, previous)
    info = _run_info(options, model, start)
    info["coverage"] = coverage_info(evaluation)
    notes = coverage_notes(info["coverage"])
    report = write_report(evaluation.records, evaluation.heatmaps, options.out, options.plots, notes)
    written = {"samples": jsonl, **report}
    written["run"] = options.out / "run.json"
    written["run"].write_text(json.dumps(info, indent=2))
    return written


def coverage_info(evaluation) -> dict:
    """The run's plan and how far it got, for run.json (merge reads it back for the report's notes)."""
    return {
        "samples_per_cell": evaluation.samples_per_cell,
        "round_size": evaluation.round_size,
        "stopped_at_budget": evaluation.stopped_at_budget,
        "evaluation_seconds": round(evaluation.seconds, 1),
        "matched_fraction": {m: {str(k): v for k, v in by.items()} for m, by in evaluation.matched.items()},
        "notes": list(evaluation.notes),
        "failures": list(evaluation.failures),
    }


def coverage_notes(coverage: dict) -> list[str]:
    """Lines for the report: the plan, whether the time budget cut it, the matched shares, what was skipped."""
    notes = [f"Planned {coverage['samples_per_cell']} samples per cell, in rounds of {coverage['round_size']}."]
    if coverage["stopped_at_budget"]:
        notes.append(
            f"The time budget stopped the run after {coverage['evaluation_seconds']} s: cells have fewer samples "
            "than planned (n in the tables)."
        )
    for method, by_length in coverage["matched_fraction"].items():
        shares = ", ".join(f"{share:.3f} at {length}" for length, share in by_length.items())
        notes.append(f"{method} ran at the reference's measured share: {shares}.")
    return notes + list(coverage["notes"]) + [f"FAILED: {f}" for f in coverage.get("failures", ())]


def write_report(records: list[dict], heatmaps: list, out: Path, plots: bool, notes: Sequence[str] = ()) -> dict:
    """results.md, heatmaps.json and (with ``plots``) the PNGs of ``records`` in ``out``; returns the paths.
    ``notes``: lines written above the tables (the run's plan and coverage)."""
    from .report import aggregate, coverage_table, markdown_table, plot_heatmap, plot_score_vs_fraction

    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    written = {"table": out / "results.md", "heatmaps": out / "heatmaps.json"}
    parts = ["".join(f"{note}\n\n" for note in notes)]
    if records:
        parts.append(coverage_table(records) + "\n")
    parts.append(markdown_table(rows))
    written["table"].write_text("".join(parts))
    written["heatmaps"].write_text(json.dumps([dataclasses.asdict(h) for h in heatmaps]))
    if plots and records:
        kinds = {r["method"]: r["kind"] for r in records}
        written["plot"] = plot_score_vs_fraction(rows, kinds, out / "score_vs_fraction.png")
        for heatmap in heatmaps:
            if heatmap.method != "dense":
                name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", heatmap.method)
                written[f"heatmap {heatmap.method}"] = plot_heatmap(heatmap, out / f"heatmap_{name}.png")
    return written


def merge(options: Options) -> dict:
    """Combine earlier runs' folders: their samples (in order), heatmaps and coverage notes (from run.json),
    one report in ``options.out``."""
    from .runner import Heatmap

    records, heatmaps, notes = [], [], []
    for folder in options.merge:
        records.extend(json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines() if line)
        path = folder / "heatmaps.json"
        if path.is_file():
            heatmaps.extend(Heatmap(**h) for h in json.loads(path.read_text()))
        info = folder / "run.json"
        coverage = json.loads(info.read_text()).get("coverage") if info.is_file() else None
        if coverage is not None:
            prefix = f"{folder.name}: " if len(options.merge) > 1 else ""
            notes.extend(prefix + note for note in coverage_notes(coverage))
    records, dropped = _drop_repeated_samples(records)
    if dropped:
        # Two runs with the same seed hold the same prompts: counted twice they would halve the intervals.
        notes.append(f"{dropped} repeated sample(s) (same method, task, length and prompt) were counted once.")
    options.out.mkdir(parents=True, exist_ok=True)
    jsonl = options.out / "samples.jsonl"
    if not any(jsonl.resolve() == (f / "samples.jsonl").resolve() for f in options.merge):
        jsonl.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    return {"samples": jsonl, **write_report(records, heatmaps, options.out, options.plots, notes)}


def _drop_repeated_samples(records: list) -> tuple[list, int]:
    """The records with each (method, task, length, prompt_hash) kept once, in order; and how many were dropped.
    Records without a prompt hash are all kept."""
    seen, kept = set(), []
    for record in records:
        key = (record["method"], record["task"], record["length"], record.get("prompt_hash"))
        if key[3] is not None and key in seen:
            continue
        seen.add(key)
        kept.append(record)
    return kept, len(records) - len(kept)


def _run_info(options: Options, model, start: float) -> dict:
    import platform

    import torch
    import transformers

    import flexprefill_hf

    info = dataclasses.asdict(options)
    info["out"] = str(options.out)
    info["methods"] = [m.label for m in options.methods]
    info["versions"] = {
        "flexprefill_hf": flexprefill_hf.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
    }
    info["model_name_or_path"] = getattr(model.config, "_name_or_path", None)
    info["device_name"] = torch.cuda.get_device_name() if torch.device(options.device).type == "cuda" else platform.processor()
    info["seconds"] = time.perf_counter() - start
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    start = time.perf_counter()  # the time budget counts from here (imports of the package come before)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = validate(args)
    except ValueError as error:
        parser.error(str(error))
    written = merge(options) if options.merge else run(options, start)
    for name, path in written.items():
        print(f"{name}: {path}")
    if not options.merge and json.loads(written["run"].read_text())["coverage"]["failures"]:
        print("some methods failed (see FAILED in results.md); the others' results are written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
