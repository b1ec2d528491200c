# Shared by .ci/gpu and benchmarks/gpu_bench.sh (sourced): run one part of a device call in its own process group.
#
#   part NAME LIMIT_S COMMAND...   runs COMMAND with stdout/stderr in $parts_dir/NAME.log; at LIMIT_S the whole
#                                  process group is ended (pytest-xdist workers included), so nothing it started
#                                  outlives it; appends "NAME rc=.. ..s <last result line>" to $summary, and
#                                  where it failed, its first pytest error line ("E ...", which names a failing
#                                  fuzz case), so the summary alone says what to replay
# Callers set parts_dir and summary first. PARTS (an extended regex, e.g. "fuzz-6|backward") runs only the parts
# whose whole name matches it.

part() {
    local name=$1 limit=$2 start rc pid dog last
    shift 2
    if [[ -n "${PARTS:-}" && ! "$name" =~ ^(${PARTS})$ ]]; then
        return 0
    fi
    start=$(date +%s)
    set -m  # background jobs get their own process group: the watchdog ends xdist workers too
    "$@" > "$parts_dir/$name.log" 2>&1 &
    pid=$!
    set +m
    # the watchdog: cancelled before the limit, it ends its sleep (trap); past it, it goes on to the KILL even when
    # cancelled (a process of the group that ignores TERM outlives the leader). It holds none of the caller's output:
    # a command piped into ``tail`` waited for the longest part's limit, not for the parts (2026-12-03, 540 s of
    # wall time for 204 s of parts). The trap ends its jobs, not a pid saved after the fork: a TERM between the fork
    # and the assignment left the sleep running (63 of 300 quick parts in a loop, 2026-12-03).
    (
        fired=""
        trap '[[ -n "$fired" ]] || { kill $(jobs -p) 2> /dev/null; exit 0; }' TERM
        sleep "$limit" &
        wait $! && { fired=1; kill -TERM -- "-$pid"; sleep 10; kill -KILL -- "-$pid"; }
    ) > /dev/null 2>&1 &
    dog=$!
    wait "$pid"
    rc=$?
    kill "$dog" 2> /dev/null
    last=$(grep -E "passed|failed|error|skipped|Error|wrote" "$parts_dir/$name.log" | tail -1)
    echo "$name rc=$rc $(( $(date +%s) - start ))s ${last}" >> "$summary"
    if (( rc != 0 )); then
        { grep -m1 -E "^E +case [0-9]+" "$parts_dir/$name.log" || grep -m1 -E "^E +[A-Za-z.]*Error" "$parts_dir/$name.log"; } |
            cut -c1-400 | sed "s/^/    $name: /" >> "$summary"
    fi
}

# Append every part log, with a header each, to the file $1 and remove the logs.
gather_logs() {
    local log
    shopt -s nullglob
    for log in "$parts_dir"/*.log; do
        printf '\n===== %s =====\n' "$(basename "$log")"
        grep -v "PytestBenchmarkWarning\|warner(PytestBenchmarkWarning" "$log"
    done > "$1"
    rm -r "$parts_dir"
}
