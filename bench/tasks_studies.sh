#!/usr/bin/env bash
# The awq and crossquant studies re-run with task accuracy and KL (issue 21) on the GPU
# machine, and the larger members of the reference family they need (docs/tasks.md "Studies").
#
#   bash bench/tasks_studies.sh train 2m,4m,8m                  # carry .carry/gutenberg-en
#   bash bench/tasks_studies.sh awq_tasks stories260k,gutenberg-llama-200k   # carry .whl
#
# "train SIZES" trains members into runs/zoo (python -m ptqscale.zoo.train_family; the
# family's recipe, GPU runs are not bitwise those of the committed family). "STUDY MODELS"
# installs .whl (lm-eval, hydra and the packages they miss there; bench/README.md) into
# /tmp/site, puts the embedded members beside the trained ones, runs the study's full-
# precision baselines (one job per model) and then its grid on MODELS, records in
# runs/results (kept on a warm machine, so a re-run skips finished jobs) copied to $OUT.
set -euo pipefail
OUT=${OUT:-/tmp/out}
ZOO=$PWD/runs/zoo
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/analysis PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT" "$ZOO"
if [ "$1" = train ]; then
  python3 -m ptqscale.zoo.train_family --data .carry/gutenberg-en --out "$ZOO" --device cuda \
    --cache runs/zoo-cache --sizes "$2"
  cp "$ZOO"/family.* "$OUT"/
  exit 0
fi
[ -d /tmp/site/lm_eval ] || python3 -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
cp -rn src/ptqscale/zoo/checkpoints/gutenberg-llama-* "$ZOO"/
case "$1" in
  awq_tasks) base=(format=bf16 method=none) ;;
  crossquant_tasks) base=(+sweep/crossquant_bits@_global_=fp +sweep/crossquant_scheme@_global_=none) ;;
  *) echo "unknown study $1 (awq_tasks, crossquant_tasks, or train)"; exit 2 ;;
esac
# Both runs stop by BUDGET_S seconds (default 540, under a call's 10 minutes) so that the
# records always reach $OUT; jobs cut off are redone by the next call.
end=$((SECONDS + ${BUDGET_S:-540}))
run() {
  timeout $((end - SECONDS > 1 ? end - SECONDS : 1)) python3 -m ptqscale.runner.app \
    +sweep="$1" "+sweep/tasks_model@_global_=$2" paths.zoo="$ZOO" \
    paths.results=runs/results progress=false wandb.mode=disabled "${@:3}"
}
status=0
run "$1" "$2" "${base[@]}" || status=$?
run "$1" "$2" || status=$?
mkdir -p runs/results/"$1"
cp -r runs/results/"$1" "$OUT"/
exit $status
