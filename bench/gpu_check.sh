#!/usr/bin/env bash
# One prepared run on a GPU machine, at most 9 minutes end to end:
#
#   bench/gpu_check.sh [--keep-files] [--only STAGE,...] [OUTDIR]
#                                                on the GPU machine, from anywhere in the checkout
#   bench/gpu_check.sh --dry-run OUTDIR          on any machine (CI): checks the plan, runs what
#                                                a CPU can, writes a dry-run SUMMARY.md
#
# Stages, one after another, each under its own time box: the build of the CUDA extension for
# this GPU only, the GPU tests, dbn-bench on the ResNet-50 batch-norm shapes, the ResNet-50
# training step, the host overhead, and SUMMARY.md. A stage that fails or runs out of time is
# logged and the next one starts: nothing is lost but that stage's own results. Each stage writes
# its files into OUTDIR (default bench/results/<gpu>/), its output into OUTDIR/<stage>.log, and
# its start, end, exit code and duration into OUTDIR/stages.tsv.
#
# At the end everything is packed into OUTDIR/gpu_check.tar.gz and OUTDIR keeps only SUMMARY.md
# and the tarball (a lent machine hands back a few files only); --keep-files keeps the loose
# files too. Unpack with: tar -xzf OUTDIR/gpu_check.tar.gz -C OUTDIR
#
# --only STAGE,...: a rerun after a fix: plan, env, build, the named stages and summary, each under
# its usual box (the names are those of stages.tsv: tests-gpu, kernels-fp32, host-overhead, ...).
#
# Exit code: 0 only if every stage succeeded; 2 for bad usage or no GPU without --dry-run.
set -uo pipefail

LIMIT_S=540            # the GPU run, build included: 9 minutes
RESERVE_S=10           # of which not for stages: the GPU probe before them and PACK_S after
PACK_S=5               # the tarball
DRY_RUN_LIMIT_S=300    # the dry run's own deadline (it takes about a minute)
KILL_GRACE_S=10        # a stage gets SIGINT at its limit (pytest still writes its junit xml),
                       # SIGKILL this much later
TEST_TIMEOUT_S=120     # per test, where pytest-timeout is installed
TEST_WORKERS=4         # pytest-xdist processes, where it is installed: Triton's and Inductor's
                       # compilers run on the host, one test at a time without it

# The kernel benchmark: every BN shape of ResNet-50 at batch 64 (12 shapes), both layouts, the two
# training modes, the project's four backends against eager PyTorch and cuDNN called directly.
KERNEL_PROVIDERS=cuda-bn,cuda-dbn,triton-bn,triton-dbn,torch,cudnn
KERNEL_CASES=(--suite resnet50 --batch 64 --layout both --mode train-fwd fwd-bwd
              --providers "$KERNEL_PROVIDERS" --budget-ms 20)
# torch.compile compiles afresh per case (10-20 s each): two shapes at the two ends of the
# reduction's shape (C=64 over 12544 values per image, C=1024 over 196), bf16 channels_last (the
# layout of mixed-precision training).
COMPILE_SHAPES=64x64x112x112,64x1024x14x14
MODEL_VARIANTS=torch,cuda-bn,cuda-dbn,triton-bn,triton-dbn
# The fused layers against eager PyTorch's norm-then-activation; the training step after fuse().
EPILOGUE_PROVIDERS=cuda-bn,cuda-dbn,torch
FUSED_VARIANTS=torch,cuda-bn-fused,cuda-dbn-fused

# The GPU tests: everything marked gpu (the cuda backend's cases of the op-contract suite among
# them), and the Triton and reference backends' cases of that suite with the Triton backend's own
# tests, which run on CUDA tensors when a GPU is present. Left out: the CPU emulation of the cuda
# backend and the ahead-of-time compile of every Triton variant for sm_80/sm_90 (host-only,
# minutes; CI runs both).
GPU_TESTS=(-m gpu tests)
TRITON_AOT_TEST=tests/test_triton.py::test_every_kernel_variant_compiles_for_sm80_and_sm90
TRITON_TESTS=(tests/test_triton.py tests/test_op_contract.py tests/test_fused_ops.py
              tests/test_fused_layers.py -k "not emu and not cuda"
              --deselect "$TRITON_AOT_TEST")

START_S=$(date +%s)
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
# After the build stage nothing may fall back to compiling the extension on first use (a minute
# of some other stage's box): without a built _C the cuda rows and tests fail fast instead.
export DBN_KERNELS_NO_JIT=1
# Inductor compiles in a pool of subprocesses by default, and at exit waits up to 300 s for the
# pool to shut down: under pytest-xdist that wait outlasted the test stage's box (seen on an
# H200). Compiling in-process costs the few torch.compile tests a little time and ends cleanly.
export TORCHINDUCTOR_COMPILE_THREADS=1
PY=${PYTHON:-python3}
# -P (Python >= 3.11): never import ./dbn_kernels by accident; the installed package is what is
# checked (in CI a regular install: the checkout's dbn_kernels/ has neither Triton kernels nor _C).
PYRUN=("$PY" -P)
"$PY" -P -c '' 2>/dev/null || PYRUN=("$PY")
DBN_BENCH=("${PYRUN[@]}" -m dbn_kernels.benchmark)

usage() {
    sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

has_module() {  # NAME...: are they all installed? Found, not imported: importing torchvision
                # would import torch, seconds of the run's clock.
    "${PYRUN[@]}" -c 'import importlib.util as u, sys
sys.exit(not all(u.find_spec(name) for name in sys.argv[1:]))' "$@" >/dev/null 2>&1
}

describe_machine() {  # the env stage: what the run ran on, beyond what each JSON records
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    echo "host $(uname -srm), $(nproc) cores"
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo '(not a git checkout)')"
    "${PYRUN[@]}" -c 'import importlib.metadata as m, sys, torch
print("python", sys.version.split()[0])
for name in ("torch", "triton", "numpy", "setuptools", "pytest", "pytest-timeout", "pytest-xdist"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sm_%d%d," % (p.major, p.minor), p.multi_processor_count, "SMs,",
          round(p.total_memory / 2**30), "GiB")'
    if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; fi
    if command -v nvidia-smi >/dev/null; then nvidia-smi; fi
}

# ---- the stage log ------------------------------------------------------------------------------

FAILED=()

log_event() {  # EVENT STAGE BOX LIMIT EXIT SECONDS STATUS NOTE
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(date +%s)" "$5" "$6" "$7" "$8" >>"$STAGE_LOG"
}

say() {  # one line per stage on the terminal: elapsed time, stage, outcome
    printf '[%3ds] %-24s %s\n' "$(($(date +%s) - START_S))" "$1" "$2"
}

skip_stage() {  # NAME BOX NOTE [optional]
    log_event skip "$1" "$2" 0 "" "" skipped "$3"
    say "$1" "skipped: $3"
    [[ ${4:-} == optional ]] || FAILED+=("$1")
}

# owed_after NAME: the boxes of the required stages after NAME in the plan, which NAME may not
# use (an alongside stage runs beside the next stage, so that one is not owed). 0 in a dry run.
owed_after() {
    [[ -n $OWED_PLAN ]] || { echo 0; return; }
    awk -F'\t' -v name="$1" '
        $1 == name { found = NR; alongside = ($3 == "alongside"); next }
        found && alongside && NR == found + 1 { next }
        found && $3 == "required" { owed += $2 }
        END { print owed + 0 }' "$OWED_PLAN"
}

# run_stage NAME BOX_S required|optional COMMAND...
# COMMAND runs under min(BOX_S, the time left before the deadline less what the later stages are
# owed), its output in NAME.log. An optional stage runs only when its whole box, and the grace
# before a kill, are left. Returns 1 when the stage did not succeed.
run_stage() {
    local name=$1 box=$2 need=$3
    shift 3
    local left limit started rc seconds status note=""
    left=$((DEADLINE_S - $(date +%s) - $(owed_after "$name")))
    limit=$((box < left ? box : left))
    if [[ $need == optional ]] && ((left < box + KILL_GRACE_S)); then
        skip_stage "$name" "$box" "optional, and only ${left} s were left for its ${box} s box" \
            optional
        return 0
    fi
    if ((limit < 5)); then
        skip_stage "$name" "$box" "no time left before the deadline"
        return 1
    fi
    log_event start "$name" "$box" "$limit" "" "" running ""
    started=$(date +%s.%N)
    timeout --signal=INT --kill-after="$KILL_GRACE_S" "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    rc=$?
    seconds=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=ok ;;
        124) status=timeout note="stopped at its ${limit} s limit" ;;
        137) status=timeout note="killed ${KILL_GRACE_S} s after its ${limit} s limit" ;;
        *) status=failed note="see $name.log" ;;
    esac
    [[ $status == ok ]] || FAILED+=("$name")
    log_event end "$name" "$box" "$limit" "$rc" "$seconds" "$status" "$note"
    say "$name" "$status (exit $rc) in ${seconds} s of ${limit} s${note:+: $note}"
    [[ $status == ok ]]
}

# ---- the stages of the GPU run ------------------------------------------------------------------
# Listed once. With ACTION=record each becomes a line of plan.tsv (name, box,
# required|optional|alongside, kind, arguments), which the planner (the plan stage, and the dry
# run) reads back; with ACTION=run each runs. An alongside stage runs in the background beside the
# next stage, and the run waits for both before going on.

ACTION=record
ALONGSIDE_PID=
ALONGSIDE_NAME=

selected() {  # NAME: is the stage part of this run (--only)?
    [[ -z $ONLY || ,$ALWAYS,$ONLY, == *",$1,"* ]]
}
ALWAYS=plan,env,build,summary

stage() {  # NAME BOX required|optional|alongside COMMAND...
    selected "$1" || return 0
    if [[ $ACTION == record ]]; then
        local IFS=$'\t'
        printf '%s\t%s\t%s\tcommand\t%s\n' "$1" "$2" "$3" "${*:4}"
    elif [[ $3 == alongside ]]; then
        run_stage "$1" "$2" required "${@:4}" &
        ALONGSIDE_PID=$! ALONGSIDE_NAME=$1
    else
        run_stage "$@"
        wait_alongside
    fi
}

wait_alongside() {  # a background stage's FAILED entry is lost with its subshell: add it here
    [[ -n $ALONGSIDE_PID ]] || return 0
    wait "$ALONGSIDE_PID" || FAILED+=("$ALONGSIDE_NAME")
    ALONGSIDE_PID='' ALONGSIDE_NAME=''
}

bench_stage() {  # NAME BOX required|optional DBN-BENCH-ARGUMENTS...: NAME.json (.csv, .png)
    local name=$1 box=$2 need=$3
    selected "$name" || return 0
    shift 3
    local args=("$@" --no-progress --json "$OUTDIR/$name.json")
    if [[ " $* " != *" --model "* ]]; then
        args+=(--csv "$OUTDIR/$name.csv")
        if ((HAS_MATPLOTLIB)); then args+=(--plot "$OUTDIR/$name.png"); fi
    fi
    if [[ $ACTION == record ]]; then
        local IFS=$'\t'
        printf '%s\t%s\t%s\tdbn-bench\t%s\n' "$name" "$box" "$need" "${args[*]}"
    else
        run_stage "$name" "$box" "$need" "${DBN_BENCH[@]}" "${args[@]}"
        wait_alongside
    fi
}

# The time boxes (seconds) of the required stages add up to LIMIT_S - RESERVE_S; the tests run
# side by side (nothing in them is timed), the benchmarks one at a time on a quiet machine.
define_stages() {
    # plan: 25 s, most of it importing torch on a cold machine (9 s on an H200 host).
    stage plan 25 required "${PLAN[@]}"
    stage env 8 required bash bench/gpu_check.sh --describe-machine
    stage build 70 required "${BUILD[@]}"
    stage tests-triton 85 alongside "${PYTEST[@]}" \
        --junitxml "$OUTDIR/tests-triton.junit.xml" "${TRITON_TESTS[@]}"
    stage tests-gpu 85 required "${PYTEST[@]}" --junitxml "$OUTDIR/tests-gpu.junit.xml" \
        "${GPU_TESTS[@]}"
    bench_stage kernels-bf16 95 required "${KERNEL_CASES[@]}" --dtype bfloat16
    bench_stage kernels-fp32 93 required "${KERNEL_CASES[@]}" --dtype float32
    bench_stage train-step 70 required --model resnet50 --batch 64 --dtype bfloat16 \
        --layout nhwc --providers "$MODEL_VARIANTS"
    bench_stage compile 50 required --suite resnet50 --batch 64 --shapes "$COMPILE_SHAPES" \
        --dtype bfloat16 --layout nhwc --mode fwd-bwd --providers torch-compile --budget-ms 20
    if [[ -f bench/host_overhead.py ]]; then
        # 10 rounds x 100 calls x 3 modes x 5 providers at ~0.3 ms a call on this machine's
        # host: ~5 s (the CPU defaults, 30 x 200, ran past 25 s on an H200's host).
        stage host-overhead 25 required "${PYRUN[@]}" -m dbn_kernels.benchmark.host_overhead \
            --rounds 10 --calls 100 --json "$OUTDIR/host-overhead.json"
    elif [[ $ACTION == run ]]; then
        skip_stage host-overhead 25 \
            "bench/host_overhead.py is not in this checkout" optional
    fi
    # The optional stages run in the time the stages above leave (each usually ends well inside
    # its box; the first H200 run used 332 of its 540 s). First what no run has measured yet: the
    # fused layers (BN+ReLU, BN+add+ReLU: 144 rows, about half of kernels-bf16's 288), and the
    # ResNet-50 step after dbn_kernels.fuse (each variant about 11 s at batch 64 on an H200).
    bench_stage kernels-epilogue 45 optional --suite resnet50 --batch 64 --dtype bfloat16 \
        --layout both --mode fwd-bwd --epilogue relu add-relu --providers "$EPILOGUE_PROVIDERS" \
        --budget-ms 20
    bench_stage train-step-fused 45 optional --model resnet50 --batch 64 --dtype bfloat16 \
        --layout nhwc --providers "$FUSED_VARIANTS"
    # Batch 256.
    bench_stage kernels-bf16-b256 70 optional --suite resnet50 --batch 256 --dtype bfloat16 \
        --layout both --mode fwd-bwd --providers "$KERNEL_PROVIDERS" --budget-ms 20
    # The training step where the GPU, not the host, sets the pace (at batch 64 the H200's host
    # was the bottleneck even for nn.BatchNorm2d).
    bench_stage train-step-b256 60 optional --model resnet50 --batch 256 --dtype bfloat16 \
        --layout nhwc --providers torch,cuda-bn,cuda-dbn
    # Last, the one experiment that wants a GPU: "does DBN help?" on ResNet-18 (BN, LayerNorm,
    # DBN at 0.25 and 1/k, the authors' variant at 0.25; 3 seeds), each finished run saved at once.
    if ((HAS_PAPER_DEPS)); then
        stage paper-resnet18 120 optional "${PYRUN[@]}" experiments/reproduce_paper.py \
            --resnet18 only --resnet18-epochs 15 --out "$OUTDIR/paper-resnet18"
    elif [[ $ACTION == run ]]; then
        skip_stage paper-resnet18 120 "torchvision or scikit-learn is not installed" optional
    fi
    stage summary 7 required "${SUMMARY[@]}"
}

# ---- the dry run: the plan, and what a CPU can run ----------------------------------------------

dry_run_stages() {
    run_stage plan 30 required "${PLAN[@]}"
    cat "$OUTDIR/plan.log"
    echo
    echo "the build stage would run: ${BUILD[*]}"
    echo
    run_stage env 15 required bash bench/gpu_check.sh --describe-machine
    # The test selections must exist (pytest ignores a --deselect that matches nothing, so the
    # left-out test is collected on its own).
    run_stage collect-tests-gpu 60 required "${PYTEST[@]}" --collect-only "${GPU_TESTS[@]}"
    run_stage collect-tests-triton 60 required "${PYTEST[@]}" --collect-only "${TRITON_TESTS[@]}"
    run_stage collect-deselected-test 60 required "${PYTEST[@]}" --collect-only \
        "$TRITON_AOT_TEST"
    # The reference backend against PyTorch's CPU batch norm, through --shapes as the compile
    # stage uses it, then the training step on a tiny ResNet-50 batch: the JSON the summary reads.
    run_stage cpu-kernels 60 required "${DBN_BENCH[@]}" --device cpu --threads 1 --suite quick \
        --shapes 8x64x16x16,4x256x4x4 --dtype float32 --layout both --mode train-fwd fwd-bwd \
        --providers reference-bn,reference-dbn,torch --budget-ms 5 --no-progress \
        --json "$OUTDIR/cpu-kernels.json" --csv "$OUTDIR/cpu-kernels.csv"
    run_stage cpu-train-step 90 required "${DBN_BENCH[@]}" --device cpu --threads 1 \
        --model resnet50 --batch 4 --image-size 32 --dtype float32 --layout nchw \
        --providers torch,reference-bn,reference-dbn --no-progress \
        --json "$OUTDIR/cpu-train-step.json"
    if [[ -f bench/host_overhead.py ]]; then
        run_stage cpu-host-overhead 30 required "${PYRUN[@]}" \
            -m dbn_kernels.benchmark.host_overhead --device cpu --rounds 3 --calls 20 \
            --warmup 5 --json "$OUTDIR/host-overhead.json"
    fi
    run_stage summary 15 required "${SUMMARY[@]}"
}

# ---- the end: SUMMARY.md and the tarball --------------------------------------------------------

ensure_summary() {  # a SUMMARY.md even when the summary stage failed: the stage log, verbatim
    [[ -s $OUTDIR/SUMMARY.md ]] && return
    {
        echo "# gpu_check: the summary could not be written (see summary.log)"
        echo
        echo '```'
        cat "$STAGE_LOG"
        echo '```'
    } >"$OUTDIR/SUMMARY.md"
}

pack() {
    local tarball=$OUTDIR/gpu_check.tar.gz files
    mapfile -t files < <(find "$OUTDIR" -mindepth 1 -maxdepth 1 ! -name gpu_check.tar.gz \
                         -printf '%f\n' | sort)
    if ! timeout 60 tar -czf "$tarball" -C "$OUTDIR" "${files[@]}" \
            || ! tar -tzf "$tarball" >/dev/null; then
        echo "gpu_check: packing $tarball failed; the files stay in $OUTDIR" >&2
        FAILED+=(pack)
        return
    fi
    if ((!KEEP_FILES)); then
        local file
        for file in "${files[@]}"; do
            [[ $file == SUMMARY.md ]] || rm -rf "${OUTDIR:?}/$file"
        done
    fi
}

# ---- main ---------------------------------------------------------------------------------------

DRY_RUN=0
KEEP_FILES=0
ONLY=
OUTDIR=
while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --keep-files) KEEP_FILES=1 ;;
        --only) ONLY=${2:?gpu_check: --only needs a comma-separated list of stages}; shift ;;
        --describe-machine) describe_machine; exit ;;  # the env stage, run under its time box
        -h | --help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) [[ -z $OUTDIR ]] || { echo "gpu_check: one OUTDIR only" >&2; exit 2; }
           OUTDIR=$1 ;;
    esac
    shift
done

if ((DRY_RUN)); then
    MODE=dry-run
    [[ -n $OUTDIR ]] || { echo "gpu_check: --dry-run needs an OUTDIR" >&2; exit 2; }
    ARCH="<the GPU's compute capability, e.g. 9.0>"
    JOBS="<the GPU machine's cores>"
    GPU_NAME=none
    RUN_LIMIT_S=$DRY_RUN_LIMIT_S
    DEADLINE_S=$((START_S + DRY_RUN_LIMIT_S))
else
    MODE=run
    probe=$("${PYRUN[@]}" -c 'import re, sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA device is visible to torch {torch.__version__}")
print(re.sub("[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))
print("%d.%d" % torch.cuda.get_device_capability())') || {
        echo "gpu_check: on a machine without a GPU, use --dry-run OUTDIR" >&2
        exit 2
    }
    GPU_NAME=$(sed -n 1p <<<"$probe")
    ARCH=$(sed -n 2p <<<"$probe")
    JOBS=$(nproc)
    OUTDIR=${OUTDIR:-bench/results/$GPU_NAME}
    RUN_LIMIT_S=$LIMIT_S
    DEADLINE_S=$((START_S + LIMIT_S - PACK_S))
fi
if [[ -d $OUTDIR && -n $(ls -A "$OUTDIR") ]]; then
    echo "gpu_check: $OUTDIR is not empty; give a new or empty directory" >&2
    exit 2
fi
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 2
STAGE_LOG=$OUTDIR/stages.tsv

# -v: each outcome is logged as the test ends, so a stage killed before pytest writes its junit
# xml still leaves them (the summary reads them from the log).
PYTEST=("${PYRUN[@]}" -m pytest -v -rfEs -p no:cacheprovider)
if has_module pytest_timeout; then PYTEST+=(--timeout "$TEST_TIMEOUT_S"); fi
if has_module xdist; then PYTEST+=(-n "$TEST_WORKERS"); fi
HAS_MATPLOTLIB=0
if has_module matplotlib; then HAS_MATPLOTLIB=1; fi
HAS_PAPER_DEPS=0
if has_module torchvision sklearn; then HAS_PAPER_DEPS=1; fi
BUILD=(env "TORCH_CUDA_ARCH_LIST=$ARCH" "MAX_JOBS=$JOBS" DBN_KERNELS_REQUIRE_CUDA_BUILD=1
       "$PY" -m pip install --no-index --disable-pip-version-check --no-build-isolation --no-deps
       -e .)
# The planner runs before the build stage has installed the package: from the checkout (pure
# Python, standard library and dbn-bench's argument parser). PYTHONPATH finds the checkout's
# dbn_kernels/, but dbn_kernels.benchmark is bench/ (setup.py's package_dir), which only an
# install maps: this line maps it the same way, then runs the module named after it. One line,
# as plan.tsv holds each stage's command on one line.
FROM_CHECKOUT='import importlib.util, runpy, sys; import dbn_kernels; '\
'spec = importlib.util.spec_from_file_location("dbn_kernels.benchmark", sys.argv.pop(1)); '\
'sys.modules[spec.name] = dbn_kernels.benchmark = importlib.util.module_from_spec(spec); '\
'spec.loader.exec_module(dbn_kernels.benchmark); '\
'runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)'
PLAN=(env "PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}" "${PYRUN[@]}" -c "$FROM_CHECKOUT"
      "$PWD/bench/__init__.py" dbn_kernels.benchmark.gpu_check_plan "$OUTDIR/plan.tsv"
      --limit-s "$((LIMIT_S - RESERVE_S))" --json "$OUTDIR/plan.json")
SUMMARY=("${PYRUN[@]}" -m dbn_kernels.benchmark.summary "$OUTDIR")

{
    printf '# gpu_check mode=%s limit_s=%s gpu=%s arch=%s started_utc=%s' \
        "$MODE" "$RUN_LIMIT_S" "$GPU_NAME" "${ARCH// /_}" \
        "$(date -u -d "@$START_S" +%Y-%m-%dT%H:%M:%SZ)"
    commit=$(git rev-parse --short HEAD 2>/dev/null) && printf ' commit=%s' "$commit"
    printf '\nevent\tstage\tbox_s\tlimit_s\tutc\tepoch_s\texit\tseconds\tstatus\tnote\n'
} >"$STAGE_LOG"
if [[ -n $ONLY ]]; then
    known=,$(ONLY='' define_stages | cut -f1 | paste -sd,),
    for name in ${ONLY//,/ }; do
        [[ $known == *",$name,"* ]] || {
            echo "gpu_check: --only: no stage named $name (stages:${known//,/ })" >&2
            exit 2
        }
    done
fi
define_stages >"$OUTDIR/plan.tsv"

if ((DRY_RUN)); then
    OWED_PLAN=''
    dry_run_stages
else
    OWED_PLAN=$OUTDIR/plan.tsv
    ACTION=run
    define_stages
fi

wait_alongside
ensure_summary
pack
echo
cat "$OUTDIR/SUMMARY.md"
echo
echo "results: $OUTDIR/SUMMARY.md and $OUTDIR/gpu_check.tar.gz"
if ((${#FAILED[@]})); then
    echo "did not succeed: ${FAILED[*]}"
    exit 1
fi
exit 0
