#!/usr/bin/env bash
# One call on a GPU machine: build, test on the GPU, benchmark. Run from the repository root:
#
#     OUT=/tmp/gpu-run bash bench/gpu_run.sh      # (the device tool sets OUT itself)
#
# A copy of the tree without .git names its commit through FASTGPT_GIT_COMMIT (results files
# record it): FASTGPT_GIT_COMMIT=$(git rev-parse HEAD) where the checkout is.
#
# The whole script ends inside GPU_RUN_SECONDS (default 570 s, under a 10-minute limit): each step
# gets a share of what is left, the benchmarks stop starting new shapes on their budget and write
# their results file after every shape, so a step cut short still leaves what it measured.
# Under $OUT (at most 7 files, none deeper than $OUT):
#     run.log                        set-up, machine, benchmark output, final tables
#     pytest.log                     the full test suite, compiled on the GPU
#     <gpu>-<date>.json              kernel + decode + KV-cache + varlen benchmark (fastgpt bench)
#     <gpu>-<date>-kernels.png, <gpu>-<date>-decode.png, <gpu>-<date>-kvcache.png
#     <gpu>-<date>-train.json        training benchmark (bench/train.py)
# Copy the .json and .png files into bench/results/ and commit them with the commit they name.

set -uo pipefail
OUT=${OUT:-/tmp/gpu-run}
LIMIT=${GPU_RUN_SECONDS:-570}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
LOG="$OUT/run.log"

left() { echo $((LIMIT - SECONDS)); }
min() { if (($1 < $2)); then echo "$1"; else echo "$2"; fi; }
say() { echo "[gpu_run +${SECONDS}s] $*" | tee -a "$LOG"; }

say "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name())"
  git log -1 --format='commit %H %s' 2>/dev/null || echo "commit ${FASTGPT_GIT_COMMIT:-unknown}"
} 2>&1 | tee -a "$LOG"

# 1. Build: the package in place, with the CUDA extension (sm_90 only, to keep the build short).
#    If that build fails or runs out of time, retry with the CPU kernels only (FASTGPT_CUDA=0),
#    then without the extension: the Triton path, the reference and torch's peers still get
#    measured. The failed build's output stays in run.log so the CUDA error can be fixed.
PIP=(python3 -m pip install -q --no-build-isolation --no-deps -e .)
T_BUILD=$(min 240 $(($(left) - 240)))
say "build with CUDA kernels (up to $T_BUILD s)"
if ! timeout "$T_BUILD" "${PIP[@]}" >>"$LOG" 2>&1; then
    say "CUDA extension build failed or timed out: retrying with FASTGPT_CUDA=0"
    if ! FASTGPT_CUDA=0 timeout "$(min 120 $(($(left) - 240)))" "${PIP[@]}" >>"$LOG" 2>&1; then
        say "CPU extension build failed too: installing without it (FASTGPT_NO_EXTENSION=1)"
        FASTGPT_NO_EXTENSION=1 "${PIP[@]}" >>"$LOG" 2>&1
    fi
fi
python3 -c "import fastgpt; print('backends', fastgpt.available_backends())" 2>&1 | tee -a "$LOG"

# 2. Correctness: the full suite, compiled on the GPU. SIGINT on timeout so pytest still prints
#    its summary of what ran.
T_TEST=$(min 180 $(($(left) - 200)))
say "pytest (up to $T_TEST s)"
timeout -s INT "$T_TEST" python3 -m pytest -q -p no:cacheprovider --durations=15 tests \
    >"$OUT/pytest.log" 2>&1
say "pytest exit code $? : $(grep -E '(passed|failed|error)' "$OUT/pytest.log" | tail -1)"

# 3. Kernel + decode benchmark (decode first, then the ragged KV-cache case, the varlen case, then
#    bf16 causal D=128, D=64, non-causal, fp16). The KV-cache case gets a third of the budget
#    (its own --kvcache-budget-s), batch sizes in the order that tells most when cut short: 64
#    (bandwidth), 1 (latency), then between.
#    TRITON_PRINT_AUTOTUNING: run.log records which Triton config won for each autotune key, to
#    compare with the compile_check table in bench/NOTES_triton.md.
T_BENCH=$(($(left) - 75))
say "kernel benchmark (budget $((T_BENCH - 40)) s, KV-cache case $(((T_BENCH - 40) / 3)) s, hard stop $T_BENCH s)"
TRITON_PRINT_AUTOTUNING=1 timeout "$T_BENCH" python3 -m fastgpt.bench --out "$OUT" --budget-s $((T_BENCH - 40)) \
    --kvcache-budget-s $(((T_BENCH - 40) / 3)) --kvcache-batches 64,1,8,16,4,32,2 \
    --warmup-ms 10 --rep-ms 50 --full-table 2>&1 | tee -a "$LOG"

# 4. Training benchmark: gpt2 preset, every backend and torch SDPA (GPT's attention_fn).
T_TRAIN=$(($(left) - 12))
say "training benchmark (hard stop $T_TRAIN s)"
timeout "$T_TRAIN" python3 bench/train.py --out "$OUT" --budget-s $((T_TRAIN - 40)) 2>&1 |
    tee -a "$LOG"

# 5. The short tables last (the device tool returns the end of the output).
say "summary"
for f in "$OUT"/*.json; do
    case "$f" in
        *-train.json) python3 bench/train.py --from-json "$f" ;;
        *) python3 -m fastgpt.bench --from-json "$f" ;;
    esac
done 2>&1 | tee -a "$LOG"
echo "pytest: $(grep -E '(passed|failed|error)' "$OUT/pytest.log" | tail -1)" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
