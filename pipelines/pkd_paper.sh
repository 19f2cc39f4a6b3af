#!/usr/bin/env bash
# The PKD paper's study for one task, as pkd-cache commands: fine-tune the teacher, dump it once, then sweep
# fine-tuned (alpha = beta = 0), vanilla KD (beta = 0), PKD-skip and PKD-last students from the store, and write
# the report (a table like the paper's Table 1, with the best dev run of each method, and a plot).
# Every stage resumes: a finished fine-tune is kept, the dump is a cache hit, finished sweep runs are skipped.
#
#   pipelines/pkd_paper.sh TEACHER_INIT TASK DATA_DIR OUT_DIR
#
# Settings from the environment (defaults sized for a 2-core CPU; the paper's grids are much larger):
#   STUDENT_LAYERS=3 EPOCHS=3 BATCH=32 MAX_LEN=128 SEED=0 TEACHER_EPOCHS=3 TEACHER_LR=2e-5 PER_PASS=4
#   FT_GRID='learning_rate=2e-5,5e-5'
#   KD_GRID='alpha=0.5,0.7 temperature=5,10 learning_rate=5e-5'
#   PKD_GRID='alpha=0.5,0.7 temperature=5,10 paper_beta=100,500 learning_rate=5e-5'
#   SEEDS='' (e.g. '0,1,2': every setting is trained once per seed and the report compares means over seeds)
#   EXTRA_DISTILL='' (more options for every student, e.g. '--max-steps 5' for a smoke run)
# Writes OUT_DIR/{teacher,TASK.zarr,sweeps/<method>/...,results.md,table1.png}.
set -euo pipefail
init=$1 task=$2 data=$3 out=$4
: "${STUDENT_LAYERS:=3}" "${EPOCHS:=3}" "${BATCH:=32}" "${MAX_LEN:=128}" "${SEED:=0}" "${PER_PASS:=4}"
: "${TEACHER_EPOCHS:=3}" "${TEACHER_LR:=2e-5}" "${EXTRA_DISTILL:=}" "${SEEDS:=}"
: "${FT_GRID:=learning_rate=2e-5,5e-5}"
: "${KD_GRID:=alpha=0.5,0.7 temperature=5,10 learning_rate=5e-5}"
: "${PKD_GRID:=alpha=0.5,0.7 temperature=5,10 paper_beta=100,500 learning_rate=5e-5}"
mkdir -p "$out"

if [ ! -f "$out/teacher/metrics.json" ]; then
  pkd-cache finetune --model "$init" --task "$task" --data-dir "$data" --output-dir "$out/teacher" \
    --epochs "$TEACHER_EPOCHS" --learning-rate "$TEACHER_LR" --batch-size "$BATCH" --max-seq-length "$MAX_LEN" \
    --seed "$SEED" --overwrite
fi
# --resume: finishes an interrupted dump; a finished one is a cache hit, a missing one starts from scratch
pkd-cache dump --teacher "$out/teacher" --task "$task" --data-dir "$data" --out "$out/$task.zarr" \
  --max-seq-length "$MAX_LEN" --resume

sweep() {  # sweep METHOD "GRID" FIXED-OPTIONS...
  local method=$1 grid=$2; shift 2
  local args=()
  for g in $grid; do args+=(--grid "$g"); done
  if [ -n "$SEEDS" ]; then args+=(--grid "seed=$SEEDS"); fi
  # shellcheck disable=SC2086  # EXTRA_DISTILL is a list of options
  pkd-cache sweep --store "$out/$task.zarr" --student-init "$init" --student-layers "$STUDENT_LAYERS" \
    --epochs "$EPOCHS" --batch-size "$BATCH" --seed "$SEED" --students-per-pass "$PER_PASS" \
    --output-dir "$out/sweeps/$method" "${args[@]}" "$@" $EXTRA_DISTILL
}
sweep ft "$FT_GRID" --alpha 0 --beta 0
sweep kd "$KD_GRID" --beta 0
sweep pkd-skip "$PKD_GRID" --strategy skip
sweep pkd-last "$PKD_GRID" --strategy last

python "$(dirname "$0")/paper_report.py" "$out"
