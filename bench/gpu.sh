#!/usr/bin/env bash
# The GPU benchmark, for one H100 without network (torch + transformers present; no ray, mlflow or optuna):
#   0. checks: imports (drugprot's training path only, never Ray/MLflow/Optuna), the staged MiniLM and corpus;
#   1. trains MiniLM (.gpu/minilm) with the paper protocol (configs/minilm.yaml: lr 5e-5, eval every 0.5 epoch,
#      focal gamma 2, interval [-10, 16], bf16) on the full corpus, for as many epochs as fit in TRAIN_SECONDS
#      (default 200; measured throughput decides, at most the protocol's 10), printing dev P/R/F1 per evaluation;
#   1b. batch size: full-corpus MiniLM trained twice for BATCH_EPOCHS epochs (default 4), in as many equal steps an
#      epoch as the old token-budget batches made (token_budget 8192, at most 64 pairs: about 61 pairs a step) and
#      in configs/minilm.yaml's batch_pairs; dev F1 of both, their ratio and a JSON line (duration not measured yet)
#   1c. options beyond the paper: full-corpus MiniLM for OPTIONS_EPOCHS epochs (default 2) as configs/minilm.yaml,
#      then with encoding.context abstract, then with model.multilabel; dev F1 of each on the held-out half B (the
#      checkpoint chosen on half A), their differences from the sentence/single-label run, and a JSON line
#   2. prints the throughput table of bench/train_throughput.py for bert-base-random: the plain loop, ours, and ours
#      under torch.compile with shape buckets, without and with CUDA graphs (THROUGHPUT_LOOPS; compiling each bucket's
#      shapes takes an untimed warm-up);
#   2b. peak GPU memory and step time of a BERT-large-sized random encoder (24 layers, 1024 hidden; 32 pairs of 256
#      tokens a step, bf16), activations kept vs train.gradient_checkpointing, with their ratios and a JSON line;
#   3. ensemble inference: one member vs five looped vs five stacked (bench/gpu_ensemble.sh);
#   4. the serving path (request validation, cross-request batcher, Predictor) in-process, batched vs unbatched;
#   4b. distillation (bench/distill.py): a MiniLM student trained on the step-1 model's probabilities
#      (DISTILL_DOCS training documents, one epoch), F1 and pairs/s next to its teacher's on dev half B;
#   5. prints a final table. About 9-10 minutes in all (TRAIN_SECONDS=200 by default).
# STEPS picks steps (default 1,2,3,4,4b; 1b, 1c and 2b only when named, e.g. `STEPS=1b,2b bench/gpu.sh`; 0 and 5 always
# run). Steps 4
# and 4b use step 1's model, so they go in its call. The paper's 10 MiniLM epochs needed about 340 s on an H200
# (2026-11-30, in the old token-budget batches of about 61 pairs: about 34 s an epoch with its two evaluations; smaller
# steps take longer), so within one 15-minute lease: `STEPS=1,4 TRAIN_SECONDS=370 bench/gpu.sh`, then
# `STEPS=2,3 bench/gpu.sh`.
#
#   bench/prepare_gpu.sh          # here, once: stages .gpu/ (MiniLM fp16, corpus, blingfire)
#   bench/gpu.sh                  # there (carry .gpu/minilm .gpu/corpus .gpu/site .gpu/pydantic); results also in $OUT (or .gpu/out) as JSON
#   bench/gpu.sh --dry-run        # here, on CPU: the same steps with tiny-random, a handful of documents, seconds
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -gt 0 ]]; then echo "usage: bench/gpu.sh [--dry-run]" >&2; exit 2; fi
export STEPS=${STEPS:-1,2,3,4,4b}
for wanted in ${STEPS//,/ }; do
  case "$wanted" in 1|1b|1c|2|2b|3|4|4b) ;; *) echo "bench/gpu.sh: STEPS: unknown step '$wanted' (steps: 1,1b,1c,2,2b,3,4,4b)" >&2; exit 2 ;; esac
done

if [[ $DRY_RUN == 1 ]]; then
  PY=${PYTHON:-.venv/bin/python}
  [[ -d .gpu/minilm && -d .gpu/corpus ]] || bench/prepare_gpu.sh
else
  PY=${PYTHON:-python3}
fi
if [[ ! -d .gpu/minilm || ! -d .gpu/corpus ]]; then
  echo "bench/gpu.sh: .gpu/ is missing: run bench/prepare_gpu.sh first and carry .gpu to this machine" >&2
  exit 2
fi

RESULTS=${OUT:-.gpu/out}            # small: JSON summaries only (on the GPU machine $OUT comes back)
SCRATCH=${SCRATCH:-${TMPDIR:-/tmp}/drugprot-gpu}   # the unpacked corpus and the run folder (weights, checkpoint)
mkdir -p "$RESULTS" "$SCRATCH"
rm -f "$RESULTS"/{train,batch,options,throughput,memory,distill}.json "$RESULTS"/ensemble_*.json  # a summary of this run's steps only
export PYTHONPATH="$PWD/platform:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import pydantic" 2>/dev/null; then  # the GPU image has none: the wheels prepare_gpu.sh unpacked
  [[ -d .gpu/pydantic ]] || { echo "bench/gpu.sh: no pydantic here and no .gpu/pydantic: rerun bench/prepare_gpu.sh" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$PWD/.gpu/pydantic"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
export HF_HUB_DISABLE_PROGRESS_BARS=1
export DRY_RUN RESULTS SCRATCH
export TRAIN_SECONDS=${TRAIN_SECONDS:-200} BATCH_EPOCHS=${BATCH_EPOCHS:-4} OPTIONS_EPOCHS=${OPTIONS_EPOCHS:-2} BENCH_SECONDS=${BENCH_SECONDS:-30} BENCH_PAIRS=${BENCH_PAIRS:-8192}
START=$(date +%s)
FAILED=()  # steps after 0 run even when one fails (one lease, one try): their names, reported at the end

step() {  # step NAME COMMAND...: run it when STEPS names it; a failure is recorded, not fatal
  local name=$1; shift
  if [[ ",$STEPS," != *",${name%% *},"* ]]; then echo "(step $name: not in STEPS=$STEPS)"; return; fi
  if ! "$@"; then echo "bench/gpu.sh: step $name failed" >&2; FAILED+=("$name"); fi
}

echo "== 0. environment"
"$PY" - <<'PYEOF'
import gzip, os, shutil, sys, time
from pathlib import Path

import torch
import transformers

import drugprot.training  # noqa: F401  (the whole training path: candidates, encoding, model, inference, scoring)
from drugprot.model.encoder import build_encoder, load_tokenizer

leaked = sorted(m for m in ("ray", "mlflow", "optuna") if m in sys.modules)
if leaked:
    sys.exit(f"gpu.sh: the training path imported {leaked}; the GPU image does not have them")

# unpack the gzipped corpus once (the official layout: one folder per split)
for source in sorted(Path(".gpu/corpus").glob("*/*.tsv.gz")):
    target = Path(os.environ["SCRATCH"]) / "drugprot" / source.parent.name / source.name[:-3]
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(source, "rb") as raw, open(target, "wb") as out:
            shutil.copyfileobj(raw, out)

started = time.perf_counter()
tokenizer = load_tokenizer(".gpu/minilm")
encoder = build_encoder(".gpu/minilm")
assert next(encoder.parameters()).dtype == torch.float32, "fp16 weights must load as fp32 for training"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, GPU {gpu}; "
      f"MiniLM from .gpu/minilm ({sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M parameters, "
      f"{len(tokenizer)} word pieces) in {time.perf_counter() - started:.1f} s; no Ray/MLflow/Optuna imported")
if os.environ["DRY_RUN"] == "0" and not torch.cuda.is_available():
    sys.exit("gpu.sh: no CUDA device (use --dry-run to rehearse on CPU)")
PYEOF

echo "== 1. MiniLM, paper protocol, full corpus"
step "1 (training)" "$PY" - <<'PYEOF'
import json, math, os, sys, time
from pathlib import Path

sys.path.insert(0, "bench")
import torch

from drugprot.candidates import corpus_candidates
from drugprot.config import load_config
from drugprot.corpus import read_split
from drugprot.training import train
from train_throughput import measure

dry = os.environ["DRY_RUN"] == "1"
results = Path(os.environ["RESULTS"])
budget = float(os.environ["TRAIN_SECONDS"])
data = str(Path(os.environ["SCRATCH"]) / "drugprot")
overrides = [f"data.dir={data}", "encoder.name=.gpu/minilm", "train.device=auto"]
if dry:  # tiny-random, a handful of documents, CPU: seconds
    overrides = [f"data.dir={data}", "encoder.name=tiny-random", "encoder.max_length=128", "data.max_train_docs=6",
                 "data.max_dev_docs=3", "train.lr=1e-3", "train.device=cpu", "train.token_budget=2048"]
config = load_config("configs/minilm.yaml", overrides)
cfg = config.train

# how many epochs fit: measure our loop's training throughput on real pairs, then plan epochs + evaluations
started = time.perf_counter()
if dry:
    pairs_per_s, epochs = float("nan"), 1.0
else:
    probe = measure(encoder=config.encoder.name, data=Path(data), pairs=3072, device="cuda", token_budget=cfg.token_budget,
                    max_batch_pairs=min(cfg.batch_pairs, cfg.max_batch_pairs),  # batches of one step's size
                    max_length=config.encoder.max_length, max_seconds=8,
                    max_docs=400, loops=("ours",), lr=cfg.lr, log=lambda m: print("  calibration:", m))
    pairs_per_s = probe["rows"][0]["pairs_per_s"]
    train_pairs = len(corpus_candidates(read_split(data, "training").documents, tuple(config.sampling.interval))[0])
    dev_pairs = len(corpus_candidates(read_split(data, "development").documents, tuple(config.sampling.interval))[0])
    eval_seconds = dev_pairs / (3 * pairs_per_s) + 3.0  # inference ≈ 3× a training step; scoring, saving
    epoch_seconds = train_pairs / pairs_per_s + eval_seconds / cfg.eval_every
    setup_seconds = 25.0  # reading, encoding once, model build
    epochs = max(cfg.eval_every, min(cfg.epochs, math.floor((budget - setup_seconds) / epoch_seconds / cfg.eval_every)
                                     * cfg.eval_every))
    print(f"  calibration: {pairs_per_s:.0f} training pairs/s; {train_pairs} training / {dev_pairs} dev pairs; "
          f"≈{epoch_seconds:.0f} s per epoch with evaluations → {epochs:g} epochs in {budget:.0f} s "
          f"(protocol: {cfg.epochs:g})")
config = load_config("configs/minilm.yaml", [*overrides, f"train.epochs={epochs}"])
calibration_seconds = time.perf_counter() - started


class OutOfTime(Exception):
    pass


t0 = time.perf_counter()
hard_limit = budget + 60  # a safety net only: the plan above should end well before


def report(metrics, run_dir):
    if time.perf_counter() - t0 > hard_limit:
        raise OutOfTime


run_dir = Path(os.environ["SCRATCH"]) / "minilm-run"
if run_dir.exists():
    import shutil

    shutil.rmtree(run_dir)  # a fresh run every time (never a silent resume of an older one)
stopped = False
try:
    result = train(config, run_dir, report=report, progress=False, log=lambda m: print("  " + m, flush=True))
    evaluations, best = result.evaluations, result.best
except OutOfTime:
    stopped = True
    saved = json.loads((run_dir / "metrics.json").read_text())
    evaluations, best = saved["evaluations"], saved["best"]
seconds = time.perf_counter() - t0
summary = {"encoder": "all-MiniLM-L6-v2" if not dry else "tiny-random (dry run)", "epochs_planned": epochs,
           "lr": config.train.lr, "gamma": config.loss.gamma, "interval": list(config.sampling.interval),
           "precision": config.train.precision if torch.cuda.is_available() else "fp32 (CPU)",
           "calibration_pairs_per_s": pairs_per_s, "calibration_seconds": calibration_seconds, "train_seconds": seconds,
           "stopped_early": stopped, "best": best,
           "evaluations": [{k: e[k] for k in ("eval", "epoch", "dev_precision_all", "dev_recall_all", "dev_f1_all", "dev_f1_a", "train_loss",
                                               "pairs_per_s")} for e in evaluations]}
(results / "train.json").write_text(json.dumps(summary, indent=1))
print(f"  trained {evaluations[-1]['epoch']:g} epochs in {seconds:.0f} s; best on dev half A at epoch {best['epoch']:g}: "
      f"whole dev F1 {best['dev_f1_all']:.4f}")
PYEOF

echo "== 1b. batch size: the old token-budget steps against configs/minilm.yaml's batch_pairs, same epochs"
step "1b (batch size)" "$PY" - <<'PYEOF'
import json, os, time
from pathlib import Path

import torch

from drugprot.candidates import corpus_candidates
from drugprot.config import load_config
from drugprot.encoding import PairEncoder, add_marker_tokens, token_budget_batches
from drugprot.model.encoder import load_tokenizer
from drugprot.training import load_documents, train

dry = os.environ["DRY_RUN"] == "1"
data = str(Path(os.environ["SCRATCH"]) / "drugprot")
overrides = [f"data.dir={data}", "encoder.name=.gpu/minilm", "train.device=auto",
             f"train.epochs={os.environ['BATCH_EPOCHS']}"]
if dry:  # tiny-random, a handful of documents, CPU: seconds
    overrides = [f"data.dir={data}", "encoder.name=tiny-random", "encoder.max_length=128", "data.max_train_docs=6",
                 "data.max_dev_docs=3", "train.lr=1e-3", "train.device=cpu", "train.token_budget=2048",
                 "train.epochs=1", "train.batch_pairs=4"]
config = load_config("configs/minilm.yaml", overrides)
cfg = config.train

# the old steps: token-budget batches (at most token_budget padded tokens and max_batch_pairs pairs) made
# this many optimizer steps an epoch; the same count of equal steps stands in for them
tokenizer = load_tokenizer(config.encoder.name)
add_marker_tokens(tokenizer)
documents = load_documents(config)[0]
candidates, _ = corpus_candidates(documents, tuple(config.sampling.interval))
pairs, _ = PairEncoder(tokenizer, max_length=config.encoder.max_length).encode(documents, candidates)
old_steps = len(token_budget_batches(pairs, token_budget=cfg.token_budget, max_pairs=cfg.max_batch_pairs))
old_pairs = -(-len(pairs) // old_steps)  # ceil: the same step count (or the nearest that equal steps give)
print(f"  {len(pairs)} training pairs: the old token-budget batches made {old_steps} steps an epoch "
      f"(about {old_pairs} pairs each); batch_pairs {cfg.batch_pairs} makes {-(-len(pairs) // cfg.batch_pairs)}")

rows = {}
for name, batch_pairs in (("old_budget_steps", old_pairs), ("batch_pairs", cfg.batch_pairs)):
    run_dir = Path(os.environ["SCRATCH"]) / f"batch-{name}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)  # a fresh run every time
    started = time.perf_counter()
    result = train(load_config("configs/minilm.yaml", [*overrides, f"train.batch_pairs={batch_pairs}"]), run_dir,
                   progress=False, log=lambda m: print("    " + m, flush=True))
    rows[name] = {"batch_pairs": batch_pairs, "steps_per_epoch": result.evaluations[-1]["steps_per_epoch"],
                  "best_dev_f1_all": result.best["dev_f1_all"], "best_epoch": result.best["epoch"],
                  "last_dev_f1_all": result.evaluations[-1]["dev_f1_all"], "seconds": round(time.perf_counter() - started, 1)}
    print(f"  {name}: {batch_pairs} pairs a step, {rows[name]['steps_per_epoch']} steps an epoch: whole dev F1 "
          f"{result.best['dev_f1_all']:.4f} at epoch {result.best['epoch']:g}, selected on half A "
          f"({rows[name]['seconds']:.0f} s)")
summary = {"bench": "batch_pairs", "encoder": "all-MiniLM-L6-v2" if not dry else "tiny-random (dry run)",
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "epochs": cfg.epochs, "lr": cfg.lr, "train_pairs": len(pairs), **rows,
           "f1_ratio_batch_pairs_over_old": round(rows["batch_pairs"]["best_dev_f1_all"]
                                                  / max(rows["old_budget_steps"]["best_dev_f1_all"], 1e-9), 4)}
(Path(os.environ["RESULTS"]) / "batch.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
PYEOF

echo "== 1c. options beyond the paper: sentence vs abstract context, single- vs multi-label, dev F1 on half B"
step "1c (context and multi-label)" "$PY" - <<'PYEOF'
import json, os, shutil, time
from pathlib import Path

import torch

from drugprot.config import load_config
from drugprot.training import train

dry = os.environ["DRY_RUN"] == "1"
data = str(Path(os.environ["SCRATCH"]) / "drugprot")
overrides = [f"data.dir={data}", "encoder.name=.gpu/minilm", "train.device=auto",
             f"train.epochs={os.environ['OPTIONS_EPOCHS']}"]
if dry:  # tiny-random, a handful of documents, CPU: seconds
    overrides = [f"data.dir={data}", "encoder.name=tiny-random", "encoder.max_length=128", "data.max_train_docs=6",
                 "data.max_dev_docs=4", "train.lr=1e-3", "train.device=cpu", "train.token_budget=2048",
                 "train.epochs=1", "train.batch_pairs=8"]
variants = {"sentence_single": [], "abstract_context": ["encoding.context=abstract"],
            "multilabel": ["model.multilabel=true"]}
rows = {}
for name, extra in variants.items():
    run_dir = Path(os.environ["SCRATCH"]) / f"options-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run every time
    started = time.perf_counter()
    result = train(load_config("configs/minilm.yaml", [*overrides, *extra]), run_dir, progress=False,
                   log=lambda m: print("    " + m, flush=True))
    dev = json.loads((result.model_dir / "drugprot.json").read_text())["dev"]  # the checkpoint chosen on half A
    rows[name] = {"set": extra, "dev_f1_b": dev["dev_f1_b"], "dev_precision_b": dev["dev_precision_b"],
                  "dev_recall_b": dev["dev_recall_b"], "dev_f1_a": dev["dev_f1_a"], "best_epoch": dev["epoch"],
                  "seconds": round(time.perf_counter() - started, 1)}
    print(f"  {name}: dev F1 on half B {dev['dev_f1_b']:.4f} (P {dev['dev_precision_b']:.4f}, R {dev['dev_recall_b']:.4f}; "
          f"checkpoint at epoch {dev['epoch']:g}, chosen on A) in {rows[name]['seconds']:.0f} s")
base = rows["sentence_single"]["dev_f1_b"]
summary = {"bench": "options", "encoder": "all-MiniLM-L6-v2" if not dry else "tiny-random (dry run)",
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "epochs": load_config("configs/minilm.yaml", overrides).train.epochs, **rows,
           "abstract_minus_sentence_f1_b": round(rows["abstract_context"]["dev_f1_b"] - base, 4),
           "multilabel_minus_single_f1_b": round(rows["multilabel"]["dev_f1_b"] - base, 4)}
(Path(os.environ["RESULTS"]) / "options.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
PYEOF

echo "== 2. throughput: bert-base-random, the plain loop vs ours, eager and compiled"
throughput() {
if [[ $DRY_RUN == 1 ]]; then
  "$PY" bench/train_throughput.py --encoder tiny-random --tokenizer .gpu/minilm --data "$SCRATCH/drugprot" \
    --max-docs 20 --pairs 48 --device cpu --max-seconds 5 --json "$RESULTS/throughput.json"
else
  "$PY" bench/train_throughput.py --encoder bert-base-random --tokenizer .gpu/minilm --data "$SCRATCH/drugprot" \
    --max-docs 900 --pairs "$BENCH_PAIRS" --device cuda --max-seconds "$BENCH_SECONDS" --json "$RESULTS/throughput.json" \
    --loops "${THROUGHPUT_LOOPS:-plain,ours,compiled,cuda-graphs}"
fi
}
step "2 (throughput)" throughput

echo "== 2b. gradient checkpointing: peak GPU memory and step time, BERT-large-sized random encoder"
step "2b (checkpointing memory)" "$PY" - <<'PYEOF'
import json, os, time
from pathlib import Path

import torch

from drugprot.encoding import LABELS, EncodedPair, collate
from drugprot.model.encoder import build_encoder
from drugprot.model.heads import RelationModel
from drugprot.model.optim import build_optimizer
from drugprot.training import enable_gradient_checkpointing, train_step

dry = os.environ["DRY_RUN"] == "1"
gpu = torch.cuda.is_available() and not dry
device = torch.device("cuda" if gpu else "cpu")
# random weights are enough: memory and time depend on the shapes alone (dry run: the tiny BERT, 4 pairs of 64)
large = {} if dry else {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                        "intermediate_size": 4096}
pairs, length, steps = (4, 64, 2) if dry else (32, 256, 5)
generator = torch.Generator().manual_seed(0)
target = (1.0,) + (0.0,) * (len(LABELS) - 1)
batch = collate([EncodedPair(tuple(torch.randint(1000, 20000, (length,), generator=generator).tolist()), 1, 2, target,
                             (0, 1), i) for i in range(pairs)], 0).to(device)
rows = {}
for name, checkpointing in (("kept", False), ("checkpointing", True)):
    encoder = build_encoder("tiny-random", tiny=large, seed=0)
    if checkpointing:
        enable_gradient_checkpointing(encoder, "BERT-large-sized random")
    model = RelationModel(encoder).to(device)
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.01, device=device)
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    train_step(model, batch, optimizer, device=device)  # the first step allocates the optimizer's moments
    if gpu:
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, batch, optimizer, device=device)
    if gpu:
        torch.cuda.synchronize(device)
    rows[name] = {"peak_mib": round(torch.cuda.max_memory_allocated(device) / 2**20) if gpu else None,
                  "step_s": round((time.perf_counter() - started) / steps, 4)}
    print(f"  {name}: peak {rows[name]['peak_mib'] if gpu else 'n/a (CPU)'} MiB, {rows[name]['step_s']:.3f} s a step")
    del model, optimizer, encoder
summary = {"bench": "gradient_checkpointing", "device": torch.cuda.get_device_name(0) if gpu else "cpu (dry run)",
           "encoder": "tiny-random (dry run)" if dry else "BERT-large-sized random (24 layers, 1024 hidden)",
           "pairs": pairs, "length": length, "precision": "bf16" if gpu else "fp32 (CPU)", **rows,
           "peak_ratio_checkpointing_over_kept": round(rows["checkpointing"]["peak_mib"] / rows["kept"]["peak_mib"], 3)
           if gpu else None,
           "step_time_ratio_checkpointing_over_kept": round(rows["checkpointing"]["step_s"] / rows["kept"]["step_s"], 3)}
(Path(os.environ["RESULTS"]) / "memory.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
PYEOF

# 3. ensemble inference: 1 member vs 5 looped vs 5 stacked (bench/ensemble_throughput.py)
export PY
step "3 (ensemble)" bash bench/gpu_ensemble.sh

echo "== 4. serving path without Ray (not on the GPU image): batched vs unbatched, MiniLM from step 1"
serving() {
if [[ $DRY_RUN == 1 ]]; then
  "$PY" bench/serve_load.py --in-process --device cpu --model "$SCRATCH/minilm-run/model" --levels 1,8 --seconds 2
else
  "$PY" bench/serve_load.py --in-process --device cuda --model "$SCRATCH/minilm-run/model" --levels 1,8,32,64 \
    --seconds "${SERVE_SECONDS:-10}"
fi
}
step "4 (serving)" serving

echo "== 4b. distillation: a student on the step-1 model's probabilities, compared on dev half B"
distillation() {
rm -rf "$SCRATCH/student"
if [[ $DRY_RUN == 1 ]]; then
  "$PY" bench/distill.py --teacher "$SCRATCH/minilm-run/model" --config configs/minilm.yaml --device cpu \
    --set "data.dir=$SCRATCH/drugprot" --set encoder.name=tiny-random --set encoder.max_length=128 \
    --set data.max_train_docs=6 --set data.max_dev_docs=3 --set train.epochs=1 --set train.device=cpu \
    --set train.token_budget=2048 --out "$SCRATCH/student" --json "$RESULTS/distill.json"
else
  "$PY" bench/distill.py --teacher "$SCRATCH/minilm-run/model" --config configs/minilm.yaml --device cuda \
    --set "data.dir=$SCRATCH/drugprot" --set encoder.name=.gpu/minilm --set "data.max_train_docs=${DISTILL_DOCS:-1500}" \
    --set train.epochs=1 --set train.device=auto --set distill.temperature=2 --set distill.weight=0.5 \
    --out "$SCRATCH/student" --json "$RESULTS/distill.json"
fi
}
step "4b (distillation)" distillation

echo "== 5. summary"
"$PY" - <<'PYEOF'
import json, os, sys
from pathlib import Path

sys.path.insert(0, "bench")
from train_throughput import format_table

results = Path(os.environ["RESULTS"])


def part(name):
    """A step's JSON, or None (with a line saying so) when that step failed."""
    path = results / name
    if not path.is_file():
        print(f"({name}: missing: its step failed or was not in STEPS; see above)\n")
        return None
    return json.loads(path.read_text())


train = part("train.json")
if train:
    print(f"{train['encoder']}, paper protocol (lr {train['lr']:g}, eval every 0.5 epoch, focal gamma {train['gamma']:g}, "
          f"interval {train['interval']}, {train['precision']}); "
          f"{train['epochs_planned']:g} epochs planned, {train['train_seconds']:.0f} s"
          + (" (stopped at the time limit)" if train["stopped_early"] else ""))
    print(f"{'eval':>5}{'epoch':>7}{'dev P':>9}{'dev R':>9}{'dev F1':>9}{'F1 A':>9}{'loss':>9}{'pairs/s':>10}")
    for e in train["evaluations"]:
        print(f"{e['eval']:>5}{e['epoch']:>7.2f}{e['dev_precision_all']:>9.4f}{e['dev_recall_all']:>9.4f}"
              f"{e['dev_f1_all']:>9.4f}{e['dev_f1_a']:>9.4f}{e['train_loss']:>9.4f}{e['pairs_per_s']:>10.0f}")
    best = train["best"]
    print(f"best on dev half A at epoch {best['epoch']:g}: whole dev F1 {best['dev_f1_all']:.4f} "
          f"(P {best['dev_precision_all']:.4f}, R {best['dev_recall_all']:.4f}; selected on A)\n")
batch = part("batch.json")
if batch:
    print(f"batch size ({batch['encoder']}, {batch['epochs']:g} epochs, lr {batch['lr']:g}, {batch['train_pairs']} pairs):")
    for name in ("old_budget_steps", "batch_pairs"):
        row = batch[name]
        print(f"  {name:<17}{row['batch_pairs']:>4} pairs a step {row['steps_per_epoch']:>6} steps an epoch   "
              f"whole dev F1 {row['best_dev_f1_all']:.4f} (epoch {row['best_epoch']:g}, selected on A)")
    print(f"  dev F1 ratio, batch_pairs over the old steps: {batch['f1_ratio_batch_pairs_over_old']}\n")
options = part("options.json")
if options:
    print(f"options beyond the paper ({options['encoder']}, {options['epochs']:g} epochs; dev half B, checkpoints chosen on A):")
    for name in ("sentence_single", "abstract_context", "multilabel"):
        row = options[name]
        print(f"  {name:<17} F1 B {row['dev_f1_b']:.4f}  P B {row['dev_precision_b']:.4f}  R B {row['dev_recall_b']:.4f}")
    print(f"  abstract - sentence {options['abstract_minus_sentence_f1_b']:+.4f}; multi-label - single "
          f"{options['multilabel_minus_single_f1_b']:+.4f}\n")
memory = part("memory.json")
if memory:
    print(f"gradient checkpointing ({memory['encoder']}, {memory['pairs']} pairs of {memory['length']} tokens, "
          f"{memory['precision']}, {memory['device']}): peak MiB kept {memory['kept']['peak_mib']}, checkpointing "
          f"{memory['checkpointing']['peak_mib']} (ratio {memory['peak_ratio_checkpointing_over_kept']}); step time "
          f"ratio {memory['step_time_ratio_checkpointing_over_kept']}\n")
throughput = part("throughput.json")
if throughput:
    print(f"throughput, {throughput['encoder']} on {throughput['device']} "
          f"({throughput['non_embedding_parameters'] / 1e6:.1f}M non-embedding parameters, {throughput['pairs']} pairs):")
    print(format_table(throughput) + "\n")
distill = part("distill.json")
if distill:
    print(f"distillation ({distill['student_encoder']} student, T {distill['temperature']:g}, weight {distill['weight']:g}, "
          f"{distill['train_seconds']:.0f} s) on dev half B: "
          + "; ".join(f"{r['name']} F1 {r['f1']:.4f}, {r['pairs_per_s']:.0f} pairs/s" for r in distill["half_b"])
          + f"; student/teacher pairs/s {distill['speedup']}x")
PYEOF
echo "bench/gpu.sh: done in $(( $(date +%s) - START )) s; JSON in $RESULTS"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "bench/gpu.sh: failed steps: ${FAILED[*]}" >&2
  exit 1
fi
