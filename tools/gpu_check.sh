#!/usr/bin/env bash
# One-shot GPU check of hrvit on one NVIDIA GPU, about 8 minutes end to end: quick-start training in fp32 and
# bf16, `hrvit predict`, the uniform-vs-adaptive profile sweep (1024²-8192², bf16), peak memory per rank under
# sequence parallelism, and which SDPA kernel hrvit's attention runs on. Summary: DIR/gpu_check.json and
# DIR/gpu_check.md (a Markdown table per section), every step's output in DIR/gpu_check.log.
#   bash tools/gpu_check.sh [DIR | --out DIR]          (default DIR: gpu_check/)
# It refuses (exit 2) where no CUDA GPU is visible. Each step runs under its own time limit, cut to what is
# left of GPU_CHECK_BUDGET_S (480); a failing step is recorded (exit status, last log lines) and the next runs.
# Environment: HRVIT_WHEELS=DIR installs missing dependencies offline from the wheels in DIR; GPU_CHECK_STEPS
# (training steps, 40), GPU_CHECK_RESOLUTIONS (1024,2048,4096,8192), GPU_CHECK_SP_TOKENS (16384 32768 65536),
# GPU_CHECK_WORK (working folder); GPU_CHECK_ALLOW_CPU=1 runs it on a CPU to test the script only.
set -uo pipefail
caller=$PWD
cd "$(dirname "$0")/.."
repo=$PWD
out=gpu_check
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
    -*) echo "gpu_check: error: unknown option $1 (usage: bash tools/gpu_check.sh [DIR])" >&2; exit 2 ;;
    *) out=$1; shift ;;
  esac
done
case $out in /*) ;; *) out=$caller/$out ;; esac
unset DS_ACCELERATOR  # let DeepSpeed find CUDA (the tests force cpu)
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if [ -x .venv/bin/python ]; then py=$repo/.venv/bin/python; else py=$(command -v python || command -v python3); fi
budget=${GPU_CHECK_BUDGET_S:-480}
steps=${GPU_CHECK_STEPS:-40}
t0=$(date +%s.%N)

# --- 0. a GPU, or nothing at all --------------------------------------------------------------------------
smi_hint() {
  if ! command -v nvidia-smi >/dev/null 2>&1; then echo "nvidia-smi not found"
  else echo "nvidia-smi lists $(nvidia-smi -L 2>/dev/null | grep -c '^GPU') GPU(s)"; fi
}
cuda_state() {  # 0: CUDA visible to torch, 1: not, 3: torch not importable
  "$py" -c 'import sys
try:
    import torch
except Exception:
    sys.exit(3)
sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}
refuse() {
  echo "gpu_check: error: no CUDA GPU visible ($1; $(smi_hint)): this script measures hrvit on a GPU;" \
    "run it on a GPU node" >&2
  exit 2
}
cuda_state
state=$?
if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
  if [ $state = 1 ]; then refuse "torch.cuda.is_available() is False"; fi
  # torch missing: only a machine whose nvidia-smi lists a GPU is worth installing it on
  if [ $state = 3 ] && [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" = 0 ]; then
    refuse "torch is not importable by $py"
  fi
fi

work=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/hrvit-gpu-check-$$}  # data, runs, profile: outside DIR, which stays small
mkdir -p "$out" "$work/logs"
rm -f "$out/gpu_check.json" "$out/gpu_check.md" "$out/gpu_check.log" "$work/steps.jsonl"
[ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ] && [ $state != 0 ] && touch "$work/CPU_ONLY"
echo "gpu_check: python $py, results in $out, working files in $work"

elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
summarize() { "$py" tools/gpu_report.py summarize "$work" "$out" --budget "$budget" "$@" >/dev/null 2>&1 || true; }
tree_of() {  # a process and all its descendants (profile.py starts its workers in their own sessions)
  ps -e -o pid=,ppid= 2>/dev/null | awk -v root="$1" '
    { parent[$1] = $2 } END { keep[root] = 1; print root; do { more = 0
      for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; print p; more = 1 } } while (more) }'
}
shown() { local c=${1//"$py"/python}; echo "${c//"$work"/WORK}"; }  # the command as the summary shows it
current=
on_signal() {
  [ -n "$current" ] && kill -KILL $(tree_of "$current") 2>/dev/null
  summarize
  exit 130
}
trap on_signal INT TERM

step() {  # step NAME LIMIT_S CMD...: run and time one step, capture its output; a failure does not stop the check
  local name=$1 limit=$2 log=$work/logs/$1.log sampler= rc start left
  shift 2
  left=$(awk -v b="$budget" -v e="$(elapsed)" 'BEGIN { printf "%d", b - e - 10 }')
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "gpu_check: [$name] skipped: the ${budget} s budget is spent"
    echo "skipped: the ${budget} s budget is spent" >"$log"
    "$py" tools/gpu_report.py record "$work" --name "$name" --rc -1 --seconds 0 --limit 0 --cmd "$(shown "$*")" \
      --status skipped
    summarize
    return
  fi
  echo "gpu_check: [$name] (limit ${limit} s) $*"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 500 \
      >"$work/logs/$name.gpumem" 2>/dev/null &
    sampler=$!
  fi
  start=$(date +%s.%N)
  "$@" >"$log" 2>&1 &
  current=$!
  local deadline=$((SECONDS + limit))
  while kill -0 "$current" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
  if kill -0 "$current" 2>/dev/null; then
    local pids
    pids=$(tree_of "$current")
    kill -TERM $pids 2>/dev/null
    sleep 5
    kill -KILL $pids 2>/dev/null
    wait "$current" 2>/dev/null
    rc=124
    echo "gpu_check: stopped after the step's limit of ${limit} s" >>"$log"
  else
    wait "$current"
    rc=$?
  fi
  current=
  local secs
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null; fi
  { echo "===== $name: exit $rc after $secs s (limit $limit s): $*"; cat "$log"; echo; } >>"$out/gpu_check.log"
  "$py" tools/gpu_report.py record "$work" --name "$name" --rc "$rc" --seconds "$secs" --limit "$limit" \
    --cmd "$(shown "$*")"
  summarize --total "$(elapsed)"
  echo "gpu_check: [$name] exit $rc in $secs s"
}

# --- 1. set-up and versions --------------------------------------------------------------------------------
imports='import hrvit, deepspeed, nibabel, openslide, tifffile'
if ! "$py" -c "$imports" >/dev/null 2>&1; then
  pip_args=(-e .)
  [ -n "${HRVIT_WHEELS:-}" ] && pip_args+=(--no-index --find-links "$HRVIT_WHEELS" --no-build-isolation)
  step setup 240 "$py" -m pip install "${pip_args[@]}"
  if [ $state = 3 ] && ! cuda_state; then refuse "torch.cuda.is_available() is False after installing torch"; fi
fi
step versions 60 "$py" tools/gpu_report.py versions "$work/versions.json"

# --- 2. the quick start on one GPU, fp32 and bf16 ------------------------------------------------------------
step synth 120 "$py" -m hrvit synth slides --family context --n 12 --size 1024 --seed 0 --out "$work/data"
train=("$py" -m hrvit train launch/recipes/quickstart.yaml "data.manifest=$work/data/manifest.csv"
  parallel.sp_size=1 data.workers=4 "train.steps=$steps")
step train_fp32 150 "${train[@]}" "output.dir=$work/runs/fp32"
step train_bf16 150 "${train[@]}" "output.dir=$work/runs/bf16" deepspeed.overrides.bf16.enabled=true

# --- 3. prediction of one held-out slide --------------------------------------------------------------------
run=$work/runs/bf16
[ -f "$run/summary.json" ] || run=$work/runs/fp32
slide=$(awk -F, '{ sub(/\r$/, "") } $3 == "val" { print $1; exit }' "$work/data/manifest.csv" 2>/dev/null)
step predict 90 "$py" -m hrvit predict "$run" --input "$work/data/${slide:-slide_000.tiff}" --out "$work/predict"

# --- 4. which SDPA kernel attention runs on ------------------------------------------------------------------
step sdpa 90 "$py" tools/gpu_report.py sdpa "$work/sdpa.json"

# --- 5. uniform vs adaptive, 1024² to 8192², bf16 ----------------------------------------------------------
step profile 270 "$py" tools/profile.py launch/recipes/quickstart.yaml parallel.sp_size=1 train.micro_batch=1 \
  L=4096 precision=bf16 data.workers=4 --sweep "resolution=${GPU_CHECK_RESOLUTIONS:-1024,2048,4096,8192}" \
  --sweep mode=uniform,adaptive --warmup 1 --steps 3 --timeout 120 --out "$work/profile" --compare mode=uniform,adaptive

# --- 6. peak memory per rank of SP-sharded sequences (ranks share the one GPU through gloo; square counts) --
for tokens in ${GPU_CHECK_SP_TOKENS:-16384 32768 65536}; do
  for sp in 1 2 4; do  # one SP size a step: what finished is kept if the budget runs out
    step "memsp_${tokens}_sp$sp" 60 "$py" tools/memory_sp.py --tokens "$tokens" --sp "$sp" --backend gloo \
      --precision bf16 --json "$work/memsp_${tokens}_sp$sp.json"
  done
done

total=$(elapsed)
summarize --total "$total"
echo "gpu_check: done in $total s: $out/gpu_check.md, $out/gpu_check.json, logs $out/gpu_check.log"
if awk -v t="$total" -v b="$budget" 'BEGIN { exit !(t > b) }'; then
  echo "gpu_check: warning: $total s is over the ${budget} s budget" >&2
fi
