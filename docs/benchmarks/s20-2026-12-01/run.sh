#!/bin/bash
# Session 20's runs (PREREG.md in this folder), one command per run, in queue order. Run from
# the repository root at the registration commit; on the 2-core CPU two one-thread workers
# took the jobs from one queue. The unseen targets' data need `apt-get install fortunes-min
# wordnet-base`.
set -euo pipefail
PY=${PY:-python}
q() { $PY -m gradsift.bench.quality --suite steady --out runs/quality-s20 --threads 1 --quiet "$@"; }
for t in definition aphorism; do
  [ -f runs/unseen/$t/stream.jsonl ] || $PY -m gradsift.cli data build --target $t \
    --out runs/unseen/$t --seed 0 --n-stream 1200 --n-target 400
done
for s in 30 31 32 33 34 35; do
  for sc in label-noise code verse unseen-definition unseen-aphorism; do
    for m in "ftw@subset=topk" ftw; do
      case $sc in
        unseen-*) t=${sc#unseen-}
          q --stream runs/unseen/$t/stream.jsonl --target runs/unseen/$t/target.jsonl \
            --name $sc --candidates 16 --budget 4 --methods "$m" --seeds $s ;;
        *) q --scenarios $sc --methods "$m" --seeds $s ;;
      esac
    done
  done
done
$PY docs/benchmarks/s20-2026-12-01/s20_analysis.py runs/quality-s20 runs/quality-s19
