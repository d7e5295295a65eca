#!/usr/bin/env bash
# What more training buys the tiny recipe: seeds trained in parallel on one CUDA GPU at the
# default schedule (--scale 1) and at a longer one (--scale $SCALE), each evaluated on the
# world's test split (easy by default; on medium and hard that split breaks the planted
# priors). Written for a lent GPU machine (the `device` tool) where torch and CUDA are
# installed but nothing can be downloaded; works on any machine with torch.
#
#   SCALE=2 SEEDS="0 1 2" OUT=/tmp/out bash scripts/gpu_scale_study.sh [smoke]
#
# Environment: WORLD (default easy; medium or hard: the guidance study's worlds), SCALE
# (default 2), SEEDS (default "0 1 2"), VARIANTS (default guided; e.g. "guided ca concat"),
# RUN_X1 (default 1: also the default schedule), DEVICE (default cuda), WORK (default
# /tmp/gss), OUT (results: summary.jsonl, table.md from scripts/scale_table.py, results.tgz
# with each run's eval JSON and metrics.jsonl), N_TRAIN (default 20000, the `make demo`
# world), PY (default python3; `python3 -P` where the checkout would shadow the installed
# package), WORLD_SET (KEY=VALUE world settings for `data synth --set`, e.g. "image_size=128
# min_size=10 max_size=32": the hard world at twice the pixels), TRAIN_SET (KEY=VALUE recipe
# settings for every run's `train --set`, e.g. "model.patch_size=16"). Runs that share a SEED
# share their data and recipe but for the schedule. DEADLINE (seconds; default none): stop
# then, as on SIGTERM (e.g. from `timeout`): unfinished runs are killed and their metrics so
# far packed as res/NAME.progress.jsonl into results.tgz (exit 124), so a device call that
# runs out still says how far each run got and what its stages validated at.
# `smoke` trains and evaluates one 2%-schedule run on a 600-image world and stops.
set -u
SCALE=${SCALE:-2}; SEEDS=${SEEDS:-"0 1 2"}; DEVICE=${DEVICE:-cuda}; WORK=${WORK:-/tmp/gss}
N_TRAIN=${N_TRAIN:-20000}; PY=${PY:-python3}; WORLD=${WORLD:-easy}
WSET=(); for kv in ${WORLD_SET:-}; do WSET+=(--set "$kv"); done
TSET=(); for kv in ${TRAIN_SET:-}; do TSET+=(--set "$kv"); done
OUT=${OUT:?set OUT to a results folder}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$WORK/res" "$OUT"
A="$PY -m agevlm_edge.cli"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

world() {   # DIR N_TRAIN: the $WORLD world (seed 0) and its tokenizer, once
  [ -f "$1/tokenizer.json" ] && return 0
  $A data synth --out "$1" --preset "$WORLD" --seed 0 --n-train "$2" "${WSET[@]}" --overwrite >/dev/null &&
    $A data tokenizer --data "$1" >/dev/null
}

job() {     # NAME SCALE SEED DATA [train args]: train, evaluate, record
  local name=$1 scale=$2 seed=$3 data=$4; shift 4
  local run="$WORK/runs/$name" t0=$SECONDS
  $A train --data "$data" --out "$run" --overwrite --scale "$scale" --set seed="$seed" \
      "${TSET[@]}" --device "$DEVICE" "$@" > "$WORK/res/$name.train.log" 2>&1 || { echo "{\"run\": \"$name\", \"failed\": \"train\"}" >> "$OUT/summary.jsonl"; tail -5 "$WORK/res/$name.train.log"; return 1; }
  local t1=$SECONDS
  $A eval --model "$run" --data "$data" --out "$WORK/res/$name.eval.json" --device "$DEVICE" \
      ${EVAL_LIMIT:+--limit $EVAL_LIMIT} > "$WORK/res/$name.eval.log" 2>&1 || { echo "{\"run\": \"$name\", \"failed\": \"eval\"}" >> "$OUT/summary.jsonl"; tail -5 "$WORK/res/$name.eval.log"; return 1; }
  cp "$run/metrics.jsonl" "$WORK/res/$name.metrics.jsonl"
  $PY - "$name" "$scale" "$seed" "$((t1 - t0))" "$((SECONDS - t1))" "$WORK/res/$name.eval.json" "$run" >> "$OUT/summary.jsonl" <<'PYEOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "scripts")
from study_guidance import metrics
name, scale, seed, t_train, t_eval, path, run = sys.argv[1:]
row = {"run": name, "scale": float(scale), "seed": int(seed), "train_s": int(t_train), "eval_s": int(t_eval)}
row.update(metrics(json.load(open(path)), Path(run)))
print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
PYEOF
  pack "$name"
}

pack() {    # what has finished so far, in case the machine's time runs out before the rest
  tar czf "$WORK/results.$1.tgz" -C "$WORK" res && mv "$WORK/results.$1.tgz" "$OUT/results.tgz"
}

stop() {    # SIGTERM or DEADLINE: kill the runs, keep how far each got
  trap - TERM
  for p in $(jobs -p); do pkill -TERM -P "$p" 2>/dev/null; kill -TERM "$p" 2>/dev/null; done
  for m in "$WORK"/runs/*/metrics.jsonl; do
    [ -f "$m" ] || continue
    name=$(basename "$(dirname "$m")")
    [ -f "$WORK/res/$name.eval.json" ] || cp "$m" "$WORK/res/$name.progress.jsonl"
  done
  pack progress; echo "stopped: unfinished runs' metrics are in $OUT/results.tgz (res/*.progress.jsonl)" >&2
  exit 124
}
trap stop TERM
WATCH=; [ -n "${DEADLINE:-}" ] && { { sleep "$DEADLINE" && kill -TERM $$; } & WATCH=$!; }

if [ "${1:-}" = smoke ]; then
  world "$WORK/small" 600 || exit 1
  EVAL_LIMIT=20 job smoke 0.02 0 "$WORK/small" && cat "$OUT/summary.jsonl"
  rc=$?; [ -n "$WATCH" ] && pkill -P "$WATCH"; exit $rc
fi
world "$WORK/data-$WORLD" "$N_TRAIN" || exit 1
RUNS=()
for v in ${VARIANTS:-guided}; do
  for seed in $SEEDS; do
    if [ "${RUN_X1:-1}" = 1 ]; then
      job "$v-s${seed}-x1" 1 "$seed" "$WORK/data-$WORLD" --variant "$v" & RUNS+=($!)
    fi
    job "$v-s${seed}-x${SCALE}" "$SCALE" "$seed" "$WORK/data-$WORLD" --variant "$v" & RUNS+=($!)
  done
done
wait "${RUNS[@]}"   # the runs, not the DEADLINE watch
[ -n "$WATCH" ] && pkill -P "$WATCH"   # its sleep; the watch then ends without a kill
pack all
$PY scripts/scale_table.py "$WORK/res" | tee "$OUT/table.md"
