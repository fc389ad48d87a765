#!/bin/bash
# Session 18's runs (PREREG.md in this folder), from the repository root after `make test`.
# On the 2-core CPU they ran as two processes of one thread each taking (scenario, method,
# seed) jobs from one queue in the order below, stopped at 06:40 UTC; here they run one by one.
set -euo pipefail
PY=.venv/bin/python
OUT=${OUT:-runs}
q() { $PY -m gradsift.bench.quality --suite steady --out $OUT/quality-s18 --scenarios $1 \
      --methods $2 --seeds $3 --threads 1 --quiet; }
q label-noise ftw 0  # the reproducibility check
for s in 10 11 12 13 14 15 16 17 18 19; do
  for m in ftw cosine greats; do q label-noise $m $s; done
  for m in ftw greats cosine; do q label-noise-1of8 $m $s; done
done
for s in 10 11 12 13 14 15 16 17 18 19; do for m in ftw cosine; do q code $m $s; done; done  # amendment 2
$PY docs/benchmarks/s18-2026-12-01/s18_analysis.py $OUT/quality-s18
