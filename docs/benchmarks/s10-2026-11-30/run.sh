#!/bin/bash
# Session 10's runs (PREREG.md in this folder), from the repository root after `make test`
# (it installs everything) and `apt-get install fortunes-min wordnet-base`. On a 2-core CPU
# the three parts ran as two processes of one thread each, ~2.5 hours in all.
set -euo pipefail
PY=.venv/bin/python
OUT=${OUT:-runs}
for t in definition aphorism; do
  [ -f $OUT/unseen/$t/stream.jsonl ] || $PY -m gradsift.cli data build --target $t \
      --out $OUT/unseen/$t --seed 0 --n-stream 1200 --n-target 400
done

# part A (and amendment 1): the trajectory suite on the two targets of session 9
part_a() {
  for seeds in 0,1,2,3,4,5 6,7,8,9,10,11; do
    for t in definition aphorism; do
      $PY -m gradsift.bench.quality --suite full --out $OUT/quality-unseen \
          --stream $OUT/unseen/$t/stream.jsonl --target $OUT/unseen/$t/target.jsonl \
          --name unseen-$t --methods ftw,greats,cosine,random --seeds $seeds --threads 1 --quiet
    done
  done
}

# part B, then the oracle (amendments 2 and 3): one-step comparisons
part_b() {
  for sc in label-noise code; do
    $PY -m gradsift.bench.branch --suite full --out $OUT/branch-options --scenarios $sc \
        --methods ftw,ftw@alignment=lcb,ftw@crossfit=true,ftw@temperature=0.1,ftw@norm_clip=2,cosine \
        --seeds 0,1,2 --threads 1 --quiet
  done
  $PY -m gradsift.bench.branch --suite full --out $OUT/branch-oracle --scenarios label-noise \
      --methods ftw,greats,cosine,random,oracle --seeds 0,1,2 --threads 1 --quiet
  $PY -m gradsift.bench.branch --suite full --out $OUT/branch-oracle --scenarios redundancy \
      --methods ftw,greats,cosine,random,oracle --seeds 0 --threads 1 --quiet
}

part_a &
part_b &
wait
$PY -m gradsift.bench.quality --suite full --out $OUT/quality-unseen --report-only
