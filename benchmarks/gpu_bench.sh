#!/usr/bin/env bash
# The GPU benchmarks, one after another in one call of the lent GPU, each alone on the device:
#
#   benchmarks/gpu_bench.sh OUT_DIR [forward] [backward] [compile] [state_terms] [chunk_state] [forward_profile] [state_ncu]
#       [plan] [host] [gate_rows] [ablate] [timeline]
#       (default: the first three; limits 9, 7, 9.3, 5, 5, 4, 2.5, 3, 3, 4 and 4 minutes: give the long ones their own device call;
#       state_terms: the backward's CUDA state-term kernels against Triton, bench_cuda_backward.py; chunk_state: the
#       forward's CUDA state kernel against Triton, its launch shapes and segment counts, bench_cuda_state.py;
#       forward_profile: the query kernel by row-block size, then one forward under ncu (OUT_DIR/ncu_forward.csv),
#       profile_forward.py; state_ncu: the CUDA state kernel's stall samples by reason and instruction under ncu's
#       full set, OUT_DIR/state_ncu_stalls.json from its source view, ncu_stalls.py; plan: the planner's choice against
#       the alternatives it weighed, bench_plan.py; host: the eager calls' host time, bench_host.py --device cuda;
#       gate_rows: gated fwd+bwd at T=65536 with the backward's gate factorings as the package has them, all off,
#       and dq_kernel's on, bench_backward.py --gate-variants; ablate: the forward's kernels at T=65536 with one piece of
#       work removed per variant, ablate_forward.py; timeline: the forward's kernels one by one as do_bench runs them, and
#       the medians with and without its L2 flush, forward_timeline.py, 2 minutes; GATED=1: state_ncu and ablate on
#       the gated forward, state_ncu's files then named state_ncu_gated*)
#
# Each benchmark runs in its own process group with a time limit (nothing it starts outlives it) and only once
# no other process holds the GPU (polled with nvidia-smi for up to 60 s; the wait and the processes seen are
# logged): rows timed beside another process are not comparable (2026-11-29: two backward runs that followed a
# killed pytest gave SDPA fwd+bwd 0.40-0.45 ms at T=2048 against the anchor's 0.125). JSON and plots go to OUT_DIR
# (copy them to benchmarks/results/ with the notes); OUT_DIR/summary.txt has one line per benchmark,
# OUT_DIR/logs.txt every log and OUT_DIR/clocks.csv the SM clock and power over the run. Manifest's and fla's wheels
# are used when importable (../shared/tools/gpu-wheels.sh prints how to install them; put their directory on
# PYTHONPATH before calling this). With them the forward takes longer: on a fresh machine its ungated half alone
# passed 4 minutes (their first tuning), on a machine that had run them once 2 minutes in all; without them 1-1.5.
# COMMIT=SHA names the code in the JSON where the device's git metadata is stale (each benchmark's --commit).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${1:?usage: benchmarks/gpu_bench.sh OUT_DIR [forward] [backward] [compile] [state_terms] [chunk_state] [forward_profile] [state_ncu] [plan] [host] [gate_rows] [ablate] [timeline]}"
shift
which=("${@:-forward backward compile}")
read -r -a which <<< "${which[*]}"
mkdir -p "$out/parts"
summary="$out/summary.txt"
: > "$summary"
source .ci/parts.sh
parts_dir="$out/parts"

gpu_alone() {  # wait (<= 60 s) until no compute process holds the GPU; log what was seen
    local waited=0 apps
    while apps=$(nvidia-smi --query-compute-apps=pid,process_name --format=csv,noheader 2> /dev/null) && [[ -n "$apps" ]]; do
        if (( waited >= 60 )); then
            echo "gpu busy after ${waited}s: ${apps//$'\n'/; }" >> "$summary"
            return 0
        fi
        sleep 5
        waited=$(( waited + 5 ))
    done
    echo "gpu idle (waited ${waited}s)" >> "$summary"
}

# The SM clock and the power draw every 200 ms while the benchmarks run (OUT_DIR/clocks.csv): under the forward's
# load the H200 reaches its 700 W cap and lowers its clock (session 38: 1980 -> 1665-1875 MHz), so the medians depend
# on it; clocks_event_reasons.active 0x4 is the software power cap.
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active \
        --format=csv -lms 200 > "$out/clocks.csv" 2>&1 &
    clock_log=$!
    trap 'kill "$clock_log" 2> /dev/null' EXIT
fi
for bench in "${which[@]}"; do
    gpu_alone
    case "$bench" in
        forward) part forward 540 python3 benchmarks/bench_forward.py --T 2048 8192 16384 65529 65536 \
            --competitors 2048 8192 65536 --tune 0 --out "$out" ${COMMIT:+--commit "$COMMIT"} ;;
        backward) part backward 420 python3 benchmarks/bench_backward.py --T 65536 2048 8192 --competitors 65536 --out "$out" ${COMMIT:+--commit "$COMMIT"} ;;
        state_terms) part state_terms 300 python3 benchmarks/bench_cuda_backward.py --stages dkv_state dq_state \
            --out "$out" ${COMMIT:+--commit "$COMMIT"} ;;
        chunk_state) part chunk_state 300 python3 benchmarks/bench_cuda_state.py --out "$out" ${COMMIT:+--commit "$COMMIT"} ;;
        forward_profile)
            part forward_profile 120 python3 benchmarks/profile_forward.py --out "$out" ${COMMIT:+--commit "$COMMIT"}
            part forward_ncu 120 ncu --clock-control none --csv --page details --launch-count 3 \
                -k 'regex:attention_kernel|retention_chunk_state|scan_kernel' --section SpeedOfLight \
                --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
                --section ComputeWorkloadAnalysis --export "$out/ncu_forward" \
                python3 benchmarks/profile_forward.py --single-call ;;
        state_ncu)  # where the CUDA state kernel's warps wait: one launch under ncu's full set, then its source view
            name="state_ncu${GATED:+_gated}"
            part "$name" 150 ncu --clock-control none --set full -k regex:retention_chunk_state --launch-count 1 \
                -f -o "$out/$name" python3 benchmarks/profile_forward.py --single-call ${GATED:+--gated}
            ncu -i "$out/$name.ncu-rep" --page source --csv --print-source sass > "$out/${name}_source.csv" \
                && python3 benchmarks/ncu_stalls.py "$out/${name}_source.csv" --out "$out/${name}_stalls.json" \
                >> "$summary" || echo "$name: no source view to summarize" >> "$summary" ;;
        gate_rows)  # the backward's gate factorings (backward.FACTORED_GATE_ROWS, FACTORED_DQ_GATE) on and off
            part gate_rows 240 python3 benchmarks/bench_backward.py --T 65536 --competitors --compiled \
                --gate-variants --out "$out" ${COMMIT:+--commit "$COMMIT"} ;;
        ablate) part ablate 240 python3 benchmarks/ablate_forward.py ${GATED:+--gated} --out "$out" \
            ${COMMIT:+--commit "$COMMIT"} ;;
        timeline) part timeline 120 python3 benchmarks/forward_timeline.py --out "$out" ${COMMIT:+--commit "$COMMIT"} ;;
        plan) part plan 180 python3 benchmarks/bench_plan.py --out "$out" ${COMMIT:+--commit "$COMMIT"} ;;
        host) part host 180 python3 benchmarks/bench_host.py --device cuda --T 2048 8192 --calls 200 --repeats 5 \
            --out "$out" ${COMMIT:+--commit "$COMMIT"} ;;
        compile) part compile 560 python3 benchmarks/bench_compile.py --device cuda --repeats 3 --out "$out" ${COMMIT:+--commit "$COMMIT"} ;;
        *) echo "unknown benchmark: $bench (forward, backward, compile, state_terms, chunk_state, forward_profile, state_ncu, plan, host, gate_rows, ablate)" >> "$summary" ;;
    esac
done
gather_logs "$out/logs.txt"
cat "$summary"
