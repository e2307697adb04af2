#!/usr/bin/env bash
# The two studies of issue 22 on the trained zoo, on one GPU: sweeps/zoo_cross.yaml (20
# members at x1, RTN and GPTQ, 13 formats, two corpora, landscape) and sweeps/zoo_depth.yaml
# (sizes 25k..150k at every revision x0.25..x4, RTN, four formats, Gutenberg).
#
# The checkpoints of both studies (~35 MiB of xz) do not fit beside the repository in one
# call's 64 MiB, so each study is packed and run on its own (STUDIES picks; default both).
# Here (once the zoo is trained and unpacked, e.g. under /work/zoo-ckpts):
#   STUDIES=zoo_cross bash bench/zoo_study.sh pack /work/zoo-ckpts  # -> .carry/zoo-study.tar.xz
# On the GPU machine (carry .carry and .whl: hydra/omegaconf wheels), from the repo root:
#   STUDIES=zoo_cross OUT=$OUT bash bench/zoo_study.sh run   # -> $OUT/zoo_cross.tar.xz + logs
# then the same with STUDIES=zoo_depth. Unpack here into one folder (records + _cache):
#   for f in zoo_*.tar.xz; do tar -xJf $f -C /work/zoo-results; done
# then the reports and the issue-22 tables into each study's folder (results/<study>/...):
#   bash bench/zoo_study.sh analyse /work/zoo-results
#
# The models are tiny (25k..440k non-embedding parameters): one process cannot keep an H200
# busy, so each study runs as one Hydra multirun per family (and per corpus), side by side on
# the one GPU (exclusive_gpu: false in the sweeps). Every run stops by BUDGET_S (default 540 s,
# under a call's 10 minutes) so that the records always reach $OUT; a re-run on a warm machine
# skips finished jobs (the store is runs/results), so cut-off jobs are redone by the next call.
# A CPU dry run: ZOO=<a zoo> FAMILIES=zoo-gpt2 CROSS_SIZES=25k DEPTH_SIZES=25k FORMATS=int4_g128
#   EXTRA="eval.max_tokens=2048 landscape.max_tokens=512 calib.nsamples=4" OUT=... ... run
set -uo pipefail
ZOO=${ZOO:-/tmp/zoo}
FAMILIES=${FAMILIES:-zoo-llama zoo-gpt2 zoo-opt zoo-neox}
CROSS_SIZES=${CROSS_SIZES:-25k 55k 150k 230k 440k}
# zoo_cross's checkpoint; another than x1 makes the study zoo_cross_<rev> (e.g. CROSS_REV=x4:
# RTN's damage is 8-11x that of x1 there, results/zoo_cross/findings.md)
CROSS_REV=${CROSS_REV:-x1}
CROSS=zoo_cross; [ "$CROSS_REV" = x1 ] || CROSS=zoo_cross_$CROSS_REV
# zoo_depth's checkpoints at 25k..150k (all five revisions, 17.6 MB of xz) fitted beside the
# repository (45.5 MB on 2026-12-05) in a call's 64 MiB; 230k would add 12.8 MB. With the zoo
# results committed the repository is 48.6 MB (2026-12-05): pack the depth study without x1 on a warm
# machine that holds zoo_cross's pack, or with fewer sizes
DEPTH_SIZES=${DEPTH_SIZES:-25k 55k 150k}
REVISIONS=(x0.25 x0.5 x1 x2 x4)
PY=${PYTHON:-python3}
STUDIES=${STUDIES:-zoo_cross zoo_depth}
has() { [[ " $STUDIES " == *" $1 "* ]]; }

if [ "${1:-}" = pack ]; then   # the checkpoints both studies read, and each family's tokenizer
  src=${2:?bash bench/zoo_study.sh pack ZOO_FOLDER}
  list=()
  for fam in $FAMILIES; do
    list+=("$fam/tokenizer")
    has zoo_cross && for s in $CROSS_SIZES; do list+=("$fam/$fam-$s-$CROSS_REV"); done
    has zoo_depth && for s in $DEPTH_SIZES; do for r in "${REVISIONS[@]}"; do
      { [ "$r" = "$CROSS_REV" ] && has zoo_cross; } || list+=("$fam/$fam-$s-$r"); done; done
  done
  mkdir -p .carry
  tar -cJf .carry/zoo-study.tar.xz -C "$src" "${list[@]}" && ls -l .carry/zoo-study.tar.xz
  exit $?
fi
if [ "${1:-}" = analyse ]; then   # report, LOFO table and D law of the returned records
  root=${2:?bash bench/zoo_study.sh analyse RESULTS_ROOT}
  export PYTHONPATH=$PWD/src:$PWD/analysis
  fit() { "$PY" -c 'import sys; from ptqscale_analysis.cli import fit_main; sys.exit(fit_main())' "$@"; }
  rep() { "$PY" -c 'import sys; from ptqscale_analysis.cli import report_main; sys.exit(report_main())' "$@"; }
  if has zoo_cross; then
    rep --results "$root" --study "$CROSS" || exit
    fit --results "$root" --study "$CROSS" --lofo family --markdown "$root/$CROSS/lofo_family.md" \
      --csv "$root/$CROSS/lofo_family.csv" || exit
  fi
  if has zoo_depth; then
    rep --results "$root" --study zoo_depth || exit
    fit --results "$root" --study zoo_depth --depth-law --markdown "$root/zoo_depth/depth_law.md"
  fi
  exit $?
fi
[ "${1:-}" = run ] || { echo "usage: bash bench/zoo_study.sh pack ZOO | run | analyse RESULTS" >&2; exit 2; }
: "${OUT:?set OUT to the folder that comes back}"
RES=${RES:-$PWD/runs/results}
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/analysis PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
mkdir -p "$OUT" "$ZOO" "$RES"
"$PY" -c "import hydra, omegaconf" 2>/dev/null || "$PY" -m pip install -q --no-index \
  --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
PACK=${PACK:-.carry/zoo-study.tar.xz}   # PACK=none: the zoo is in $ZOO already
if [ -f "$PACK" ]; then   # adds to a zoo already there (a warm machine)
  tar -xJf "$PACK" -C "$ZOO" || exit 2
fi
end=$((SECONDS + ${BUDGET_S:-540}))
left() { echo $((end - SECONDS > 1 ? end - SECONDS : 1)); }
members() {  # family, sizes -> comma-separated model names
  local fam=$1; shift; local out=(); for s in "$@"; do out+=("$fam-$s"); done
  (IFS=,; echo "${out[*]}")
}
run() {  # study, log name, overrides...
  timeout "$(left)" "$PY" -m ptqscale.runner.app +sweep="$1" paths.zoo="$ZOO" \
    paths.results="$RES" progress=false wandb.mode=disabled ${FORMATS:+format=$FORMATS} \
    "${@:3}" ${EXTRA:-} > "$LOGS/$2.log" 2>&1
}
"$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
start=$SECONDS
LOGS=$RES/logs
mkdir -p "$LOGS"
pids=()
has zoo_cross && for fam in $FAMILIES; do   # 2 processes per family (one per corpus)
  for data in gutenberg wikitext2; do
    # shellcheck disable=SC2086
    run zoo_cross "cross-$fam-$data" model="$(members "$fam" $CROSS_SIZES)" data=$data \
      model.revision="$CROSS_REV" study="$CROSS" &
    pids+=($!)
  done
done
has zoo_depth && for fam in $FAMILIES; do   # 2 processes per family (revisions split)
  for revs in x0.25,x0.5,x1 x2,x4; do
    # shellcheck disable=SC2086
    run zoo_depth "depth-$fam-${revs%%,*}" model="$(members "$fam" $DEPTH_SIZES)" \
      model.revision=$revs &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p"; done
echo "$STUDIES done after $((SECONDS - start)) s"
grep -h "\[failed\]" "$LOGS"/*.log | head -20
# $OUT takes 8 files: one archive per study with its records, the model-level caches (full-
# precision NLL, landscape) they were measured with, and the logs
status=0
for study in $STUDIES; do
  [ "$study" = zoo_cross ] && study=$CROSS
  n=$(ls "$RES/$study/records" 2>/dev/null | wc -l)
  echo "$study: $n records, $(ls "$RES/$study/records" 2>/dev/null | grep -c '^invalid-') invalid"
  caches=(); for c in fp_eval landscape; do [ -d "$RES/_cache/$c" ] && caches+=("_cache/$c"); done
  tar -cJf "$OUT/$study.tar.xz" -C "$RES" "$study" "${caches[@]}" logs || status=1
done
ls -l "$OUT"
exit $status
