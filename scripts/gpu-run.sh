#!/usr/bin/env bash
# GPU first contact, run on the device machine from the repository root in ONE call:
#
#   bash gpu-carry/run.sh          (scripts/gpu-carry.sh built gpu-carry/ here and copied
#                                   this file there as run.sh)
#
# Every step has its own budget (seconds, the table below; they add up to at most 420 s =
# 7 minutes, checked by tests/gpu_script.rs), runs under `timeout`, and appends its output
# to its log under $OUT as it goes, so a step that hangs loses nothing of the steps before.
# $OUT/summary.txt is the first thing to read: one line per step, "pass", "fail (first
# failure)" or "not run (why)". Logs (at most 8 files come back): summary.txt, facts.txt,
# stages.txt, tests.txt, sanitizer.txt, bench.txt.
set -u

# step budgets, seconds (name budget) -- keep the sum <= 420
BUDGETS="
facts 8
stages-w1 13
stages-w1n 10
stages-w1s 10
stages-e2 12
stages-e4 15
stages-f32 15
stages-ds 15
test-gpu_abi 15
test-gpu_layer 68
test-gpu_model 34
test-fixtures 14
test-gpu_nvshmem 25
test-gpu_roofline 15
memcheck 25
racecheck 25
synccheck 16
graph-replay 15
bench-tiny 10
bench-flashmoe-paper 12
bench-qwen3-30b-a3b 12
bench-olmoe-1b-7b 12
bench-mixtral-8x7b 12
bench-deepseek-v3 12
"

OUT="${OUT:-/tmp/flashmoe-out}"
mkdir -p "$OUT"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bench="$here/flashmoe-bench"
export FLASHMOE_EXPECT_GPU=1 RUST_BACKTRACE=1
# cuBLAS (roofline peaks) and the NVSHMEM host library from the image's Python packages.
site="$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null || true)"
for d in "$site"/nvidia/*/lib; do [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
export LD_LIBRARY_PATH
nv="$(ls "$site"/nvidia/nvshmem/lib/libnvshmem_host.so.3 2>/dev/null | head -n 1)"
[ -n "$nv" ] && export FLASHMOE_NVSHMEM_LIB="$nv"
export NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_DISABLE_NCCL=1
summary="$OUT/summary.txt"
: >"$summary"
total="$(echo "$BUDGETS" | awk '{ s += $2 } END { print s }')"

budget_of() { echo "$BUDGETS" | awk -v n="$1" '$1 == n { print $2 }'; }

# The line that best says why a step failed: a stage FAIL or ERROR line, a panic message,
# a failed test, a sanitizer error, or the last line.
why() {
    local f="$1" l="" pat
    for pat in '^stage [a-z0-9]+: (FAIL|ERROR)' 'panicked at' '^test .* FAILED' \
        '=+ (ERROR|Invalid|Race|Barrier)|ERROR SUMMARY: [1-9]' '[Ee]rror|not found'; do
        # A panic's message is on the line after "panicked at".
        l="$(grep -m1 -A1 -E "$pat" "$f" | tr '\n' ' ')"
        [ -n "$l" ] && break
    done
    [ -n "$l" ] || l="$(tail -n 1 "$f")"
    echo "${l:0:400}"
}

# step NAME LOG CMD...: runs CMD within NAME's budget, appends its output to $OUT/LOG and
# one line to the summary.
step() {
    local name="$1" log="$2" budget tmp rc t0 dt
    shift 2
    budget="$(budget_of "$name")"
    if [ -z "$budget" ]; then
        echo "$name: not run (no budget in the table)" >>"$summary"
        return
    fi
    # The run as a whole stays inside the sum of the budgets, whatever a step overran by.
    if [ $((SECONDS + budget)) -gt "$total" ]; then
        echo "$name: not run (the run's ${total}s are spent: ${SECONDS}s used)" >>"$summary"
        return
    fi
    tmp="$(mktemp)"
    t0=$SECONDS
    echo "===== $name (budget ${budget}s): $*" >>"$OUT/$log"
    timeout -k 2 "$budget" "$@" >"$tmp" 2>&1
    rc=$?
    dt=$((SECONDS - t0))
    cat "$tmp" >>"$OUT/$log"
    if [ $rc -eq 0 ]; then
        # The step's figures on its summary line: a stage / test / sanitizer verdict, or a
        # bench's tiles (with the other modes' ratios), latency, roofline and phases lines.
        local facts
        facts="$(grep -m1 -E '^stages: pass|^test result:|ERROR SUMMARY' "$tmp")"
        # Which tiles a stage run's GEMM0 exercised (e.g. "4 decode + 0 prefill + 8 wide").
        facts="$facts $(grep -m1 -oE '^stage gemm0: pass .*tile tasks' "$tmp" | grep -oE '[0-9]+ decode.*tile tasks')"
        [ -n "${facts// /}" ] || facts="$(grep -E '^  (tiles|latency|roofline|phases) ' "$tmp" |
            sed -E 's/^ +//; s/ +/ /g' | tr '\n' '|' | cut -c1-900)"
        echo "$name: pass (${dt}s) $facts" >>"$summary"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "$name: fail (budget of ${budget}s exceeded; last: $(tail -n 1 "$tmp" | cut -c1-300))" >>"$summary"
    elif grep -q -E 'Device not supported|Target application terminated before first instrumented API call|Unable to find injection' "$tmp"; then
        echo "$name: not run (the sanitizer cannot instrument this machine: $(why "$tmp"))" >>"$summary"
    else
        echo "$name: fail (exit $rc: $(why "$tmp"))" >>"$summary"
    fi
    rm -f "$tmp"
}

# ---- device and build facts
step facts facts.txt bash -c "nvidia-smi; r=\$?; '$bench' probe; cat '$here/ptxas-report.txt'; exit \$r"

# ---- stage checks on tiny: world 1, emulated 2 and 4 (bf16), then f32
# 512 tokens on one rank: 128-row pair lists, so auto's wide tasks run (CPU census: 4 decode
# + 8 wide tile tasks per GEMM stage).
step stages-w1 stages.txt "$bench" stages --backend gpu --preset tiny --tokens 512
# The same layer with no wide task (--tiles narrow: 64-row prefill and decode tiles only), so
# that a failure of stages-w1 alone points at the wide tile.
step stages-w1n stages.txt "$bench" stages --backend gpu --preset tiny --tokens 512 --tiles narrow
# The same layer without the early first stage of the next task (--tiles auto-serial: auto's
# tiles; in auto and narrow a routed tile issues the next task's step 0 before its
# completion step, kernel/include/flashmoe/next_stage.cuh), so that a failure of stages-w1
# and stages-w1n with this step passing points at that overlap.
step stages-w1s stages.txt "$bench" stages --backend gpu --preset tiny --tokens 512 --tiles auto-serial
# gpt-oss style: top-k of biased logits, clamped SwiGLU with expert biases.
step stages-e2 stages.txt "$bench" stages --backend gpu --preset tiny --world emulated:2 \
    --router topk-softmax --mlp clamped-swiglu
# The classic tile path (the others run the tile rule's decode tiles where blocks are short).
step stages-e4 stages.txt "$bench" stages --backend gpu --preset tiny --world emulated:4 --tiles classic
step stages-f32 stages.txt "$bench" stages --backend gpu --preset tiny --dtype f32 --world emulated:2 \
    --router sparse-mixer
# DeepSeek-style routing: sigmoid + selection bias, group-limited top-k, f32 router, a
# shared expert, scaled weights (the preset's router and MLP otherwise).
step stages-ds stages.txt "$bench" stages --backend gpu --preset tiny --world emulated:2 \
    --experts 16 --top-k 4 --router sigmoid-bias --groups 4/2 --router-f32 --shared 1

# ---- the existing GPU tests (a skip is a failure: FLASHMOE_EXPECT_GPU=1); graph replay
#      runs as its own step below
for t in gpu_abi gpu_layer gpu_model gpu_nvshmem gpu_roofline; do
    if [ -x "$here/tests/$t" ]; then
        step "test-$t" tests.txt "$here/tests/$t" --test-threads=1 --skip graph_replays \
            --skip every_fixture_matches_transformers_on_the_gpu
    else
        echo "test-$t: not run (no executable in the carry)" >>"$summary"
    fi
done
# transformers' fixtures through the kernel (every family, block and chain, GPU layer and
# GPU model; --nocapture prints one error line per comparison)
if [ -x "$here/tests/gpu_model" ]; then
    step test-fixtures tests.txt "$here/tests/gpu_model" --exact \
        every_fixture_matches_transformers_on_the_gpu --nocapture
else
    echo "test-fixtures: not run (no gpu_model executable)" >>"$summary"
fi

# ---- compute-sanitizer on a small config (one whole-layer launch, long deadlines); 192
#      tokens of tiny on 4 experts give decode, prefill and wide tile tasks (CPU census: 2 + 2
#      + 2 per GEMM stage; 160 tokens on 8 experts: no wide task)
cs="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -n 1)"
for tool in memcheck racecheck synccheck; do
    if [ -z "$cs" ]; then
        echo "$tool: not run (compute-sanitizer not found)" >>"$summary"
        continue
    fi
    step "$tool" sanitizer.txt "$cs" --tool "$tool" --error-exitcode 9 \
        "$bench" stages --backend gpu --preset tiny --tokens 192 --experts 4 --only combine --timeout-ms 20000
done

# ---- graph replay (100 replays, no reset between them)
if [ -x "$here/tests/gpu_layer" ]; then
    step graph-replay tests.txt "$here/tests/gpu_layer" --exact graph_replays_equal_and_need_no_reset
else
    echo "graph-replay: not run (no gpu_layer executable)" >>"$summary"
fi

# ---- a short bench of every preset (checked before timed), each with every tile rule in
#      one process (auto, then classic, narrow and auto-serial, and the ratios of their
#      medians); deepseek-v3 with 64 of its 256 experts: generating its 11 G parameters on the
#      host alone outlasts the budget
for p in tiny flashmoe-paper qwen3-30b-a3b olmoe-1b-7b mixtral-8x7b; do
    step "bench-$p" bench.txt "$bench" layer --backend gpu --preset "$p" --iters 10 --warmup 2 --check-tokens 16 \
        --compare-tiles
done
step bench-deepseek-v3 bench.txt "$bench" layer --backend gpu --preset deepseek-v3 --experts 64 \
    --iters 10 --warmup 2 --check-tokens 16 --compare-tiles

echo "total: ${SECONDS}s of at most ${total}s budgeted" >>"$summary"
cat "$summary"
