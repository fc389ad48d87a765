#!/bin/bash
# Session 15's runs (PREREG.md in this folder), from the repository root after `make test`.
# On the 2-core CPU they ran as two processes of one thread each taking (scenario, methods,
# seed) jobs from one queue in the order below, stopped at 22:50 UTC; here the two halves run
# side by side to the end. The out folder is the one of sessions 13-14.
set -euo pipefail
PY=.venv/bin/python
OUT=${OUT:-runs}
q() { local sc=$1 methods=$2; shift 2; for s in "$@"; do $PY -m gradsift.bench.quality \
      --suite steady --out $OUT/quality-s13 --scenarios $sc --methods $methods --seeds $s \
      --threads 1 --quiet; done; }
(q verse ftw,greats,cosine 0 2 4 6 8; q verse random 0 2 4 6 8
 q label-noise-1of8 ftw,greats,cosine 0 2 4 6 8; q label-noise-1of8 random 0 2 4 6 8) &
(q verse ftw,greats,cosine 1 3 5 7 9; q verse random 1 3 5 7 9
 q label-noise-1of8 ftw,greats,cosine 1 3 5 7 9; q label-noise-1of8 random 1 3 5 7 9) &
wait
$PY -m gradsift.bench.quality --suite steady --out $OUT/quality-s13 --report-only --quiet
$PY docs/benchmarks/s15-2026-11-30/s15_analysis.py $OUT/quality-s13
