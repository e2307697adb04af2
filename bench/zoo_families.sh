#!/usr/bin/env bash
# Train every zoo family of conf/zoo (4 families x 5 sizes, checkpoints at 1/4..4 x base
# tokens) on one GPU and pack the checkpoints for a GPU machine's return channel (<= 8 files,
# 16 MiB each, 64 MiB in all): 4 zoo-part-NN.tar.xz + manifest.json + zoo.md + train.log.
#
# Needs the first Gutenberg train shard (the recipes read train-00 only, train_shards: 1);
# valid and test come from the package assets. Carry it as .carry/train-00.jsonl.xz:
#   mkdir -p .carry && cp ../shared/data/gutenberg-en/train-00.jsonl.xz .carry/
# then on the GPU machine, from the repo root:
#   OUT=$OUT bash bench/zoo_families.sh
# Unpack here: for f in zoo-part-*.tar.xz; do tar -xJf $f -C /work/zoo-ckpts; done
# (then paths.zoo=/work/zoo-ckpts; conf/model/zoo-<family>-<size>.yaml, model.revision=x4).
set -uo pipefail
: "${OUT:?set OUT to the folder that comes back}"
SHARD=${SHARD:-.carry/train-00.jsonl.xz}
DATA=/tmp/zoo-data/gutenberg-en
ZOO=${ZOO:-/tmp/zoo}
mkdir -p "$DATA" "$ZOO"
[ -f "$SHARD" ] || { echo "no $SHARD (the first Gutenberg train shard): carry it" >&2; exit 2; }
ln -sf "$PWD/$SHARD" "$DATA/train-00.jsonl.xz"
ln -sf "$PWD/src/ptqscale/assets/data/gutenberg-en/valid.jsonl.xz" "$DATA/valid.jsonl.xz"
ln -sf "$PWD/src/ptqscale/assets/data/gutenberg-en/test.jsonl.xz" "$DATA/test.jsonl.xz"
export PYTHONPATH=$PWD/src
PY=${PYTHON:-python}
"$PY" -m ptqscale.zoo.factory plan all | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
# training stops at 420 s whatever it finished (re-running resumes at the first unfinished
# size of each family); packing takes ~20 s
start=$(date +%s)
# FAMILIES, SIZES, DEVICE and TRAIN_S only for a dry run of this script on a CPU
timeout "${TRAIN_S:-420}" "$PY" -m ptqscale.zoo.factory train ${FAMILIES:-all} --data "$DATA" \
    --out "$ZOO" --device "${DEVICE:-cuda}" --jobs 4 ${SIZES:+--sizes $SIZES}
echo "train exit $? after $(( $(date +%s) - start )) s"
"$PY" -m ptqscale.zoo.factory pack --out "$ZOO" --to "$OUT"
cat "$ZOO"/*.log > "$OUT/train.log"
ls -l "$OUT"
