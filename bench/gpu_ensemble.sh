#!/usr/bin/env bash
# Ensemble inference throughput on the GPU: one member vs 5 members looped vs 5 members stacked (fold),
# same pairs, same run (bench/ensemble_throughput.py). Goal: stacked >= 0.35x one member's pairs/s (a loop gives ~0.2x).
# Step 3 of bench/gpu.sh, which runs it with PY, DRY_RUN and RESULTS exported (.gpu/minilm is the staged MiniLM).
# Standalone: PYTHONPATH=platform:.gpu/site PY=python3 DRY_RUN=0 RESULTS=.gpu/out bash bench/gpu_ensemble.sh
set -euo pipefail
: "${PY:=python3}" "${DRY_RUN:=0}" "${RESULTS:=.gpu/out}"
echo "== ensemble throughput: 1 member vs 5 looped vs 5 stacked"
if [[ $DRY_RUN == 1 ]]; then
  "$PY" bench/ensemble_throughput.py --encoder tiny-random --tokenizer .gpu/minilm --members 3 --pairs 64 --repeats 1 \
    --device cpu --json-out "$RESULTS/ensemble_tiny.json"
else
  "$PY" bench/ensemble_throughput.py --encoder .gpu/minilm --members 5 --pairs 4096 --max-length 256 --repeats 3 \
    --device cuda --precision bf16 --json-out "$RESULTS/ensemble_minilm.json"
  "$PY" bench/ensemble_throughput.py --encoder bert-base-random --tokenizer .gpu/minilm --members 5 --pairs 4096 \
    --max-length 256 --repeats 3 --device cuda --precision bf16 --json-out "$RESULTS/ensemble_bert_base.json"
fi
