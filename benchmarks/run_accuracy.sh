#!/usr/bin/env bash
# The accuracy suite (issue 10) on the GPU.
#
#   bash benchmarks/run_accuracy.sh GROUP [METHOD...]
#
# The one-call run (what the issue-10 numbers come from; ~290 s wall on the device after staging):
#   all         every method below in one run, in priority order: dense, flexprefill (preset),
#               flexprefill:gamma=0.9, streaming:fraction=match, vertical_slash:fraction=match (at each length
#               the preset's share measured there in round 0), flexprefill_vs_only, flexprefill_qa_only,
#               flexprefill:gamma=0.8|0.85|0.99. Rounds of ROUND (16) samples per (task, length, method) cell,
#               round after round, batches of BATCH (176 = 11 tasks x 16: one batch per method and length per
#               round), --time-budget BUDGET (280 s from the start, the model load included): the run stops
#               starting batches when the next would not fit and writes what ran (results.md says how many
#               samples each cell got). Writes 5 small files into DEST (default $OUT/acc, else ./accuracy_runs/all):
#               samples.jsonl, results.md, heatmaps.json, run.json, log.txt; no plots there (draw them here
#               with --merge). Exit status 1 if a method failed (the others' results are written).
#   bash benchmarks/gpu_session.sh run bash benchmarks/run_accuracy.sh all
# Groups of the earlier plan, one call each (METHOD specs as in `python -m flexprefill_hf.eval --help`;
# given METHODs replace the group's):
#   core        dense, flexprefill (the model's preset: SmolLM2 -> default, gamma 0.95, tau 0.1), flexprefill:gamma=0.9
#   ablations   flexprefill_vs_only (tau 0), flexprefill_qa_only (tau 1e9)
#   sweep       flexprefill:gamma=0.8|0.85|0.99 (with core's 0.9 and 0.95: the five-point sweep of the plot)
#   baselines   streaming:fraction=$FRACTION, vertical_slash:fraction=$FRACTION; run it once per length
#               (LENGTHS=2048 FRACTION=<FlexPrefill's mean computed share at 2048 from core>, and so on)
#   NAME        any other name: the METHODs given
# Environment: LENGTHS (default "2048 4096 8192"), SAMPLES (32), BATCH (32), TASKS (all), SEED (0),
#   DEVICE (cuda), DTYPE (bfloat16), RESULTS (default $OUT/accuracy, else ./accuracy_runs).
# Every FlexPrefill and baseline method runs with cuda_dense_below=0 (set by the suite), so the sparse
# kernels really run at these lengths. Output: RESULTS/GROUP[-LENGTHS]/{samples.jsonl,results.md,heatmaps.json,run.json}
# (plots too where matplotlib is installed). Combine the groups afterwards, on any machine with matplotlib:
#   python -m flexprefill_hf.eval --merge DIR... --out benchmarks/accuracy
# On the device this runs after benchmarks/gpu_session.sh has staged the embedded model:
#   bash benchmarks/gpu_session.sh run bash benchmarks/run_accuracy.sh core
set -euo pipefail
cd "$(dirname "$0")/.."

GROUP=${1:?usage: $0 GROUP [METHOD...]}
shift
LENGTHS=${LENGTHS:-2048 4096 8192}
RESULTS=${RESULTS:-${OUT:+$OUT/accuracy}}
RESULTS=${RESULTS:-accuracy_runs}
if [ "$GROUP" = all ]; then
    [ $# -eq 0 ] || { echo "the group all takes no METHODs" >&2; exit 2; }
    DEST=${DEST:-${OUT:+$OUT/acc}}
    DEST=${DEST:-accuracy_runs/all}
    mkdir -p "$DEST"
    rc=0
    # shellcheck disable=SC2086  # LENGTHS and TASKS are word lists
    # The hard limit (LIMIT, 320 s) sends SIGTERM: the suite then writes the outputs of what ran.
    timeout -s TERM "${LIMIT:-320}" python3 -m flexprefill_hf.eval --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" --lengths $LENGTHS \
        --tasks ${TASKS:-all} --samples "${SAMPLES:-32}" --round-size "${ROUND:-16}" --batch-size "${BATCH:-176}" \
        --time-budget "${BUDGET:-280}" --seed "${SEED:-0}" --out "$DEST" --no-plots --methods dense flexprefill \
        "flexprefill:gamma=0.9" "streaming:fraction=match" "vertical_slash:fraction=match" flexprefill_vs_only \
        flexprefill_qa_only "flexprefill:gamma=0.8|0.85|0.99" 2>"$DEST/log.txt" || rc=$?
    # What to read in the call's output (none of it may end the script before `exit $rc`):
    tr '\r' '\n' <"$DEST/log.txt" | grep -v '^ *$' | tail -n 25 || true  # progress, warnings, any traceback
    sed -n '1,/^| task |/p' "$DEST/results.md" | sed '$d' || true  # the notes and the samples-per-cell table
    grep '\*\*average\*\*' "$DEST/results.md" || true
    echo "run_accuracy.sh all: exit status $rc"
    exit $rc
fi
if [ $# -gt 0 ]; then
    METHODS=("$@")
else
    case "$GROUP" in
        core) METHODS=(dense flexprefill "flexprefill:gamma=0.9") ;;
        ablations) METHODS=(flexprefill_vs_only flexprefill_qa_only) ;;
        sweep) METHODS=("flexprefill:gamma=0.8|0.85|0.99") ;;
        baselines)
            : "${FRACTION:?baselines needs FRACTION: the mean computed share of FlexPrefill at these LENGTHS}"
            METHODS=("streaming:fraction=$FRACTION" "vertical_slash:fraction=$FRACTION") ;;
        *) echo "unknown group $GROUP and no METHODs given" >&2; exit 2 ;;
    esac
fi
NAME=$GROUP
[ "$GROUP" = baselines ] && NAME="$GROUP-${LENGTHS// /-}"
PLOTS=()
python3 -c "import matplotlib" 2>/dev/null || PLOTS=(--no-plots)
# shellcheck disable=SC2086  # LENGTHS and TASKS are word lists
python3 -m flexprefill_hf.eval --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" --lengths $LENGTHS \
    --tasks ${TASKS:-all} --samples "${SAMPLES:-32}" --batch-size "${BATCH:-32}" --seed "${SEED:-0}" \
    --methods "${METHODS[@]}" --out "$RESULTS/$NAME" "${PLOTS[@]}"
grep '\*\*average\*\*' "$RESULTS/$NAME/results.md"
