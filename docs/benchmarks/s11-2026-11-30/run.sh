#!/bin/bash
# Session 11's runs (PREREG.md in this folder), from the repository root after `make test`
# (it installs everything). On a 2-core CPU they ran as two processes of one thread each,
# about 2.5 hours in all; here each part runs its two halves side by side.
set -euo pipefail
PY=.venv/bin/python
OUT=${OUT:-runs}

# part A: min_cosine, one step at a time (phase 1 fixed the thresholds from ftw's logged
# cosines: seed 0's states, pooled 25th and 50th percentiles of the positive ones)
for sc in label-noise code; do
  $PY -m gradsift.bench.branch --suite full --out $OUT/branch-mincos --scenarios $sc \
      --methods ftw,cosine --seeds 0 --threads 1 --quiet &
done
wait
for sc in label-noise code; do
  $PY -m gradsift.bench.branch --suite full --out $OUT/branch-mincos --scenarios $sc \
      --methods ftw,ftw@min_cosine=0.016,ftw@min_cosine=0.054,cosine --seeds 0,1,2 \
      --threads 1 --quiet &
done
wait
$PY -m gradsift.bench.branch --out $OUT/branch-mincos --report-only

# part B: the oracle (every pair stepped and evaluated) on redundancy and code, seed 0
for sc in redundancy code; do
  $PY -m gradsift.bench.branch --suite full --out $OUT/branch-oracle --scenarios $sc \
      --methods ftw,greats,cosine,random,oracle --seeds 0 --threads 1 --quiet &
done
wait
$PY -m gradsift.bench.branch --out $OUT/branch-oracle --report-only --versus oracle

# part C (amendments 2-3): label noise, ftw against cosine, seeds 10-39, both methods per seed
half() {
  for s in "$@"; do
    $PY -m gradsift.bench.quality --suite full --out $OUT/quality-s11 --scenarios label-noise \
        --methods ftw,cosine --seeds $s --threads 1 --quiet
  done
}
half $(seq 10 2 38) &
half $(seq 11 2 39) &
wait
$PY -m gradsift.bench.quality --out $OUT/quality-s11 --report-only

# part D (amendment 4): definitions, ftw against cosine, fresh seeds (session 10's data:
# `gradsift data build --target definition --out $OUT/unseen/definition --seed 0
# --n-stream 1200 --n-target 400`); the seeds that finished are in BENCHMARKS.md
U=$OUT/unseen/definition
[ -f $U/stream.jsonl ] || $PY -m gradsift.cli data build --target definition --out $U --seed 0 \
    --n-stream 1200 --n-target 400
defs() {
  for s in "$@"; do
    $PY -m gradsift.bench.quality --suite full --out $OUT/quality-s11-def --stream $U/stream.jsonl \
        --target $U/target.jsonl --name unseen-definition --methods ftw,cosine --seeds $s \
        --threads 1 --quiet
  done
}
defs $(seq 12 2 28) &
defs $(seq 13 2 29) &
wait
$PY -m gradsift.bench.quality --out $OUT/quality-s11-def --report-only
