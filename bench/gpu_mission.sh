#!/usr/bin/env bash
# The mission on one GPU: the product's own flow (Ray Tune trials sharing the card, an ensemble of the study, Ray
# Serve over HTTP) where the image has no Ray, MLflow or Optuna. bench/prepare_gpu.sh stages their wheels with
# MiniLM and the corpus in .gpu/mission as parts of one call each; the calls follow each other within the machine's
# idle release (the machine keeps the stashed parts only while warm), one prepared command per call:
#
#   bench/gpu_mission.sh --plan       # here: the calls in order, what each carries (measured), runs and costs
#   bench/gpu_mission.sh --call N     # there: call N of the plan (the last one joins, installs and runs the mission)
#   bench/gpu_mission.sh --dry-run    # here, on CPU: the same flow with tiny-random and the bundled sample
#
# Call 1 records what the machine already holds (cached models, pip list, GPU) in $OUT/inventory.json. Every call
# stashes the part it carried. The last call then runs, in order of value, each step with its own cap, so a slow one
# cannot starve the rest (CAP_* seconds; the whole call ends by MISSION_S; the study gets what the install leaves,
# less the later steps' caps, at most CAP_TUNE):
#   a. drugprot tune: MiniLM on the full corpus, TUNE_TRIALS trials at TUNE_GPUS of the card each, the paper space,
#      TUNE_EPOCHS epochs per trial; its MLflow store and Optuna storage come back in $OUT/stores.tar.gz
#   b. drugprot ensemble: --top-k ENSEMBLE_K of the study, then --reseed RESEED of its best trial (fractional GPUs)
#      in what is left of the step, then single / top-k / reseeded on dev half B (bench/ensemble_half_b.py)
#   c. Serve over HTTP on the GPU: bench/serve_load.py deploys drugprot serve's application (build_app) twice,
#      batched and unbatched, on GPU replicas, and sends 1, 8 and 64 clients to each
#   d. if BATCH_MIN_S are left: BATCH_STEPS of bench/gpu.sh (default 1b: MiniLM with the new batch default against
#      the old budget batches); otherwise the line says it needs a lease of its own
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-}
case "$MODE" in
  --plan|--dry-run) [[ $# -eq 1 ]] || { echo "usage: bench/gpu_mission.sh --plan | --call N | --dry-run" >&2; exit 2; } ;;
  --call) [[ $# -eq 2 && "$2" =~ ^[1-9][0-9]*$ ]] || { echo "usage: bench/gpu_mission.sh --call N (N: 1, 2, ...)" >&2; exit 2; }
          CALL=$2 ;;
  *) echo "usage: bench/gpu_mission.sh --plan | --call N | --dry-run" >&2; exit 2 ;;
esac

# the caps (seconds); --plan prints them and adds them up against the lease
export CAP_INSTALL=${CAP_INSTALL:-90} CAP_TUNE=${CAP_TUNE:-300} CAP_ENSEMBLE=${CAP_ENSEMBLE:-120} \
       CAP_SERVE=${CAP_SERVE:-90} MISSION_S=${MISSION_S:-540}
export TUNE_TRIALS=${TUNE_TRIALS:-8} TUNE_GPUS=${TUNE_GPUS:-0.25} TUNE_EPOCHS=${TUNE_EPOCHS:-1} \
       ENSEMBLE_K=${ENSEMBLE_K:-3} RESEED=${RESEED:-3}
# d: the bench/gpu.sh step that trains MiniLM with the new batch default against the old budget batches (1b), run
# only when BATCH_MIN_S seconds are left (BATCH_STEPS= leaves it out); its JSON goes to $OUT/gpu (bench/gpu.sh clears
# its own files, ensemble_*.json among them, from the folder it writes to)
BATCH_STEPS=${BATCH_STEPS-1b} BATCH_MIN_S=${BATCH_MIN_S:-300}
MISSION=${MISSION_DIR:-.gpu/mission}

if [[ $MODE == --plan ]]; then
  exec "${PYTHON:-python3}" bench/gpu_payload.py plan "$MISSION"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
export HF_HUB_DISABLE_PROGRESS_BARS=1 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false RAY_AUTH_MODE=disabled
START=$(date +%s)
FAILED=()

capped() {  # capped NAME CAP COMMAND...: run with at most CAP seconds (never past MISSION_S); a failure is recorded
  local name=$1 cap=$2; shift 2
  local left=$(( MISSION_S - ($(date +%s) - START) ))
  (( cap > left )) && cap=$left
  if (( cap < 10 )); then echo "== $name: skipped, ${left} s left of MISSION_S=$MISSION_S"; FAILED+=("$name (no time)"); return; fi
  echo "== $name (cap ${cap} s, $(( $(date +%s) - START )) s into the call)"
  local began=$(date +%s) code=0
  export STEP_DEADLINE=$(( began + cap ))  # a step may give part of its time to an optional part (the reseed)
  if declare -F "$1" >/dev/null; then  # a step function: timeout runs a new bash that holds it and what it reads
    timeout -s INT -k 20 "$cap" bash -c "set -eo pipefail; $(declare -p PY CONFIG SPACE DEVICE STORE STUDY SCRATCH \
      RESULTS SERVE_SECONDS SETS TUNE_RESOURCES RESEED_RESOURCES SERVE_RESOURCES 2>/dev/null); $(declare -f "$1"); $1" \
      || code=$?
  else
    timeout -s INT -k 20 "$cap" "$@" || code=$?
  fi
  echo "== $name: exit $code after $(( $(date +%s) - began )) s"
  if (( code != 0 )); then FAILED+=("$name (exit $code)"); fi
}

if [[ $MODE == --dry-run ]]; then
  PY=${PYTHON:-.venv/bin/python}
  RESULTS=${OUT:-.gpu/dry-out}
  SCRATCH=${SCRATCH:-${TMPDIR:-/tmp}/drugprot-mission-dry-$$}
  rm -rf "$SCRATCH" && mkdir -p "$SCRATCH" "$RESULTS"
  trap 'rm -rf "$SCRATCH"' EXIT
  export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
  DATA=$("$PY" -c "from drugprot.config import SAMPLE_DIR; print(SAMPLE_DIR)")
  # the calls' mechanics on a small payload of the same form: three parts, stashed call by call, joined, checked
  mkdir -p "$SCRATCH/stage/corpus" && cp -r "$DATA"/development "$SCRATCH/stage/corpus/"
  "$PY" bench/gpu_payload.py pack "$SCRATCH/stage" "$SCRATCH/mission" --part-mib 0.02
  PARTS=$(ls "$SCRATCH/mission" | grep -c '^part-')
  for call in $(seq 1 "$PARTS"); do  # each call sees only its own part
    mkdir -p "$SCRATCH/call" && cp "$SCRATCH/mission/manifest.json" "$SCRATCH/call/"
    cp "$SCRATCH/mission/part-$(printf %02d $((call - 1)))" "$SCRATCH/call/"
    "$PY" bench/gpu_payload.py stash "$SCRATCH/call" "$SCRATCH/stash" && rm -r "$SCRATCH/call"
  done
  mkdir -p "$SCRATCH/call" && cp "$SCRATCH/mission/manifest.json" "$SCRATCH/call/"
  "$PY" bench/gpu_payload.py join "$SCRATCH/call" "$SCRATCH/stash" "$SCRATCH/joined"
  diff -r "$SCRATCH/stage/corpus" "$SCRATCH/joined/corpus" && echo "(dry run: the joined payload equals the staged one;"\
    "pip install skipped: this environment has the packages)"
  CONFIG=configs/smoke.yaml SPACE=search_spaces/smoke.yaml DEVICE=cpu
  SETS=(--set "data.dir=$DATA" --set train.epochs=1 --set train.device=cpu --set train.threads=1)
  TUNE_TRIALS=2 ENSEMBLE_K=2 RESEED=1 SERVE_SECONDS=1
  TUNE_RESOURCES=(--cpus-per-trial 0.5 --max-concurrent 2)   # half a CPU stands in for the GPU share
  RESEED_RESOURCES=(--cpus-per-trial 0.5)
  free_port() { "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
  SERVE_RESOURCES=(--port "$(free_port)" --gcs-port "$(free_port)")  # other runs on this machine may hold the defaults
  CAP_TUNE=400 CAP_ENSEMBLE=400 CAP_SERVE=300 MISSION_S=1500  # 2 shared CPU cores: time, not caps, is the point here
else
  PY=${PYTHON:-python3}
  RESULTS=${OUT:-.gpu/out}
  SCRATCH=${SCRATCH:-${TMPDIR:-/tmp}/drugprot-mission}
  mkdir -p "$RESULTS" "$SCRATCH"
  echo "== call $CALL: stash the part it carried"
  "$PY" bench/gpu_payload.py stash "$MISSION" .gpu/stash
  if [[ $CALL == 1 ]]; then
    echo "== what the machine holds already (cached models, packages, GPU) -> inventory.json"
    timeout 60 "$PY" bench/gpu_payload.py inventory "$RESULTS/inventory.json" || echo "(inventory failed: exit $?)"
  fi
  PARTS=$("$PY" -c "import json,sys; print(len(json.load(open(sys.argv[1]))['parts']))" "$MISSION/manifest.json")
  if (( CALL < PARTS )); then
    echo "bench/gpu_mission.sh: call $CALL of $PARTS done; next: bench/gpu_mission.sh --call $((CALL + 1))"
    exit 0
  fi
  echo "== join the parts, install Ray, MLflow, Optuna"
  "$PY" bench/gpu_payload.py join "$MISSION" .gpu/stash .gpu
  install() {
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -q --no-index --find-links .gpu/wheels --no-compile \
      --no-cache-dir -r .gpu/requirements.txt
  }
  capped install "$CAP_INSTALL" install
  "$PY" -c "import ray, mlflow, optuna, pydantic" || { echo "bench/gpu_mission.sh: the install failed" >&2; exit 1; }
  export PYTHONPATH="$PWD/platform:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
  DATA="$SCRATCH/drugprot"
  "$PY" - "$DATA" <<'PYEOF'
import gzip, shutil, sys
from pathlib import Path

for source in sorted(Path(".gpu/corpus").glob("*/*.tsv.gz")):  # the official layout, one folder per split
    target = Path(sys.argv[1]) / source.parent.name / source.name[:-3]
    target.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(source, "rb") as raw, open(target, "wb") as out:
        shutil.copyfileobj(raw, out)
PYEOF
  CONFIG=configs/minilm.yaml SPACE=search_spaces/paper.yaml DEVICE=cuda SERVE_SECONDS=${SERVE_SECONDS:-6}
  SETS=(--set "data.dir=$DATA" --set "encoder.name=$PWD/.gpu/minilm" --set "train.epochs=$TUNE_EPOCHS"
        --set train.device=auto)
  CPUS=$(( $(nproc) / 5 > 0 ? $(nproc) / 5 : 1 ))  # four trials and the driver share the cores
  TUNE_RESOURCES=(--gpus-per-trial "$TUNE_GPUS" --cpus-per-trial "$CPUS")
  RESEED_RESOURCES=(--gpus-per-trial 0.33 --cpus-per-trial "$CPUS")
  SERVE_RESOURCES=(--gpus-per-replica 0.5)
fi

STORE="sqlite:///$SCRATCH/mlflow.db"
STUDY=mission
rm -f "$RESULTS"/{tune,ensemble_topk,ensemble_reseed,half_b}.json "$RESULTS"/serve.log "$RESULTS"/stores.tar.gz

tune_study() {
  "$PY" -m drugprot tune --config "$CONFIG" --space "$SPACE" "${SETS[@]}" --name "$STUDY" \
    --num-samples "$TUNE_TRIALS" "${TUNE_RESOURCES[@]}" --storage "$SCRATCH/tune" --tracking-uri "$STORE" \
    --optuna-storage "sqlite:///$SCRATCH/optuna.db" --json > "$RESULTS/tune.json"
}
# the study gets what the install left, less what the later steps are promised (at most CAP_TUNE)
TUNE_CAP=$(( MISSION_S - ($(date +%s) - START) - CAP_ENSEMBLE - CAP_SERVE ))
capped "a. tune" "$(( TUNE_CAP < CAP_TUNE ? TUNE_CAP : CAP_TUNE ))" tune_study

ensembles() {  # top-k first (no training); the reseed gets what is left but the half-B scoring's last 30 s
  local code=0
  "$PY" -m drugprot ensemble --study "$STUDY" --top-k "$ENSEMBLE_K" --tracking-uri "$STORE" --device "$DEVICE" \
    --out "$SCRATCH/ensemble-topk" --no-log --json --quiet > "$RESULTS/ensemble_topk.json" || return $?
  timeout -s INT -k 10 $(( STEP_DEADLINE - $(date +%s) - 30 )) \
    "$PY" -m drugprot ensemble --study "$STUDY" --reseed "$RESEED" "${RESEED_RESOURCES[@]}" --tracking-uri "$STORE" \
    --device "$DEVICE" --out "$SCRATCH/ensemble-reseed" --no-log --json --quiet > "$RESULTS/ensemble_reseed.json" || code=$?
  local scored=(--ensemble "top-k=$SCRATCH/ensemble-topk")
  [[ -f $SCRATCH/ensemble-reseed/ensemble.json ]] && scored+=(--ensemble "reseeded=$SCRATCH/ensemble-reseed")
  "$PY" bench/ensemble_half_b.py "${scored[@]}" --device "$DEVICE" --json "$RESULTS/half_b.json" || code=$?
  return $code
}
capped "b. ensemble" "$CAP_ENSEMBLE" ensembles

serving() {
  local model=$SCRATCH/ensemble-reseed
  [[ -f $model/ensemble.json ]] || model=$SCRATCH/ensemble-topk
  "$PY" bench/serve_load.py --model "$model" "${SERVE_RESOURCES[@]}" --levels 1,8,64 --seconds "$SERVE_SECONDS" \
    2>&1 | tee "$RESULTS/serve.log"
}
capped "c. serve over HTTP" "$CAP_SERVE" serving

if [[ -z $BATCH_STEPS ]]; then
  echo "== d. batch default vs old budget batches: left out (BATCH_STEPS is empty)"
elif [[ $MODE == --dry-run && ! -d .gpu/minilm ]]; then
  echo "== d. batch default: skipped (bench/gpu.sh --dry-run needs .gpu/ staged: run bench/prepare_gpu.sh first)"
elif [[ $MODE == --dry-run ]]; then
  capped "d. batch default" 600 env STEPS="$BATCH_STEPS" OUT="$RESULTS/gpu" SCRATCH="$SCRATCH/gpu" bash bench/gpu.sh --dry-run
elif (( MISSION_S - ($(date +%s) - START) < BATCH_MIN_S )); then
  echo "== d. batch default: skipped, less than BATCH_MIN_S=$BATCH_MIN_S s left; it needs a lease of its own:" \
       "STEPS=$BATCH_STEPS bench/gpu.sh"
else
  capped "d. batch default" "$MISSION_S" env STEPS="$BATCH_STEPS" OUT="$RESULTS/gpu" SCRATCH="$SCRATCH/gpu" bash bench/gpu.sh
fi

# what comes back: the study's MLflow store and Optuna storage (metadata; the weights stay there)
tar -czf "$RESULTS/stores.tar.gz" -C "$SCRATCH" $(cd "$SCRATCH" && ls mlflow.db optuna.db 2>/dev/null) 2>/dev/null \
  || echo "(no store to send back)"
echo "bench/gpu_mission.sh: done in $(( $(date +%s) - START )) s; results in $RESULTS"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "bench/gpu_mission.sh: failed or skipped: ${FAILED[*]}" >&2
  exit 1
fi
