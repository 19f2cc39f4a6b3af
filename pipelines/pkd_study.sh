#!/usr/bin/env bash
# The PKD study for one task, as pkd-cache commands: fine-tune the teacher, dump it once, then train students
# from the store: fine-tuning (alpha = beta = 0), vanilla KD (beta = 0), PKD-skip and PKD-last.
# Each stage is skipped when its output is already complete, so the recipe can be re-run after an interruption.
#
#   pipelines/pkd_study.sh TEACHER_INIT TASK DATA_DIR OUT_DIR
#
# Settings come from the environment (defaults: the figures quoted in DEVELOPERS.md for this 2-core machine):
#   STUDENT_LAYERS=3 EPOCHS=1 LR=5e-5 BATCH=32 MAX_LEN=64 SEED=0 ALPHA=0.5 TEMPERATURE=10 BETA= (default 100/H)
#   TEACHER_EPOCHS=1 TEACHER_LR=5e-5
#   JOBS=1: students trained at once (each with nproc/JOBS threads; on a 2-core CPU, JOBS=2 finishes sooner)
# Writes OUT_DIR/{teacher,TASK.zarr,students/*}, OUT_DIR/times.tsv and OUT_DIR/results.md.
set -euo pipefail
init=$1 task=$2 data=$3 out=$4
: "${STUDENT_LAYERS:=3}" "${EPOCHS:=1}" "${LR:=5e-5}" "${BATCH:=32}" "${MAX_LEN:=64}" "${SEED:=0}"
: "${ALPHA:=0.5}" "${TEMPERATURE:=10}" "${BETA:=}" "${TEACHER_EPOCHS:=1}" "${TEACHER_LR:=5e-5}" "${JOBS:=1}"
mkdir -p "$out/students"
times="$out/times.tsv"
[ -f "$times" ] || printf 'stage\tseconds\tcommand\n' > "$times"

stage() {  # stage NAME DONE_MARKER command...
  local name=$1 marker=$2; shift 2
  if [ -e "$marker" ]; then echo "== $name: done already ($marker)"; return; fi
  echo "== $name: $*"
  local t0; t0=$(date +%s)
  "$@"
  printf '%s\t%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" "$*" >> "$times"
}

stage teacher "$out/teacher/metrics.json" \
  pkd-cache finetune --model "$init" --task "$task" --data-dir "$data" --output-dir "$out/teacher" \
    --epochs "$TEACHER_EPOCHS" --learning-rate "$TEACHER_LR" --batch-size "$BATCH" --max-seq-length "$MAX_LEN" \
    --seed "$SEED" --overwrite
stage dump "$out/$task.zarr.done" \
  pkd-cache dump --teacher "$out/teacher" --task "$task" --data-dir "$data" --out "$out/$task.zarr" \
    --max-seq-length "$MAX_LEN" --overwrite
touch "$out/$task.zarr.done"  # reached only once the dump has succeeded (set -e)

common=(--store "$out/$task.zarr" --student-layers "$STUDENT_LAYERS" --student-init "$init" --epochs "$EPOCHS"
        --learning-rate "$LR" --batch-size "$BATCH" --seed "$SEED" --temperature "$TEMPERATURE" --overwrite)
beta=(); [ -n "$BETA" ] && beta=(--beta "$BETA")
students=(
  "ft|--alpha 0 --beta 0"
  "kd|--alpha $ALPHA --beta 0"
  "pkd-skip|--alpha $ALPHA ${beta[*]} --strategy skip"
  "pkd-last|--alpha $ALPHA ${beta[*]} --strategy last"
)
threads=$(( $(nproc) / JOBS )); [ "$threads" -ge 1 ] || threads=1
running=0
for s in "${students[@]}"; do
  name=${s%%|*}; flags=${s#*|}
  # shellcheck disable=SC2086  # $flags is a list of options
  stage "student-$name" "$out/students/$name/metrics.json" env OMP_NUM_THREADS="$threads" \
    pkd-cache distill "${common[@]}" $flags --output-dir "$out/students/$name" > "$out/students/$name.log" 2>&1 &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait

python "$(dirname "$0")/report.py" "$out" | tee "$out/results.md"
