#!/bin/bash
# Session 17's runs (PREREG.md in this folder), from the repository root after `make test`.
# On the 2-core CPU they ran as two processes of one thread each taking (target, method, seed)
# jobs from one queue in the order below, stopped at 03:45 UTC; here they run one by one.
set -euo pipefail
PY=.venv/bin/python
OUT=${OUT:-runs}
for s in 0 1 2 3 4 5 6 7 8 9; do for m in ftw greats cosine random; do
  for t in definition aphorism; do
    $PY -m gradsift.bench.quality --suite steady --out $OUT/quality-s17-unseen \
      --stream runs/unseen/$t/stream.jsonl --target runs/unseen/$t/target.jsonl \
      --name unseen-$t --candidates 16 --budget 4 --methods $m --seeds $s --threads 1 --quiet
  done
done; done
$PY docs/benchmarks/s17-2026-12-01/s17_analysis.py $OUT/quality-s17-unseen
