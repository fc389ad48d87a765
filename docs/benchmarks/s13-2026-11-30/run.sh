#!/bin/bash
# Session 13's runs (PREREG.md in this folder), from the repository root after `make test`.
# On the 2-core CPU they ran as two processes of one thread each taking (scenario, seed) jobs
# from one queue in the order below; here the two halves run side by side.
set -euo pipefail
PY=.venv/bin/python
OUT=${OUT:-runs}
q() { for s in "$@"; do $PY -m gradsift.bench.quality --suite steady --out $OUT/quality-s13 \
      --scenarios $SC --methods ftw,greats,cosine --seeds $s --threads 1 --quiet; done; }
(SC=redundancy q 0 2 4 6 8; SC=label-noise q 0 2 4 6 8) &
(SC=redundancy q 1 3 5 7 9; SC=label-noise q 1 3 5 7 9) &
wait
# amendment 2: ftw's subset at uniform weights, label noise and redundancy interleaved
fo() { for s in "$@"; do for sc in label-noise redundancy; do
      $PY -m gradsift.bench.quality --suite steady --out $OUT/quality-s13 --scenarios $sc \
      --methods ftw-filter-only --seeds $s --threads 1 --quiet; done; done; }
fo 0 2 4 6 8 &
fo 1 3 5 7 9 &
wait
$PY -m gradsift.bench.quality --suite steady --out $OUT/quality-s13 --report-only
$PY docs/benchmarks/s13-2026-11-30/s13_spread.py $OUT/quality-s13
