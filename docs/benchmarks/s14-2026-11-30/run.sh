#!/bin/bash
# Session 14's runs (PREREG.md in this folder), from the repository root after `make test`.
# On the 2-core CPU they ran as two processes of one thread each taking (scenario, seed) jobs
# from one queue in the order below; here the two halves run side by side. The out folder is
# session 13's (its redundancy seeds 0-9 are pooled with 10-19).
set -euo pipefail
PY=.venv/bin/python
OUT=${OUT:-runs}
q() { local sc=$1 methods=$2; shift 2; for s in "$@"; do $PY -m gradsift.bench.quality \
      --suite steady --out $OUT/quality-s13 --scenarios $sc --methods $methods --seeds $s \
      --threads 1 --quiet; done; }
(q redundancy ftw,greats,cosine 10 12 14 16 18; q code ftw,greats,cosine 0 2 4 6 8) &
(q redundancy ftw,greats,cosine 11 13 15 17 19; q code ftw,greats,cosine 1 3 5 7 9) &
wait
# amendments 1-2: random on the same seeds
(q redundancy random 0 2 4 6 8 10 12 14 16 18; q code random 0 2 4 6 8) &
(q redundancy random 1 3 5 7 9 11 13 15 17 19; q code random 1 3 5 7 9) &
wait
$PY -m gradsift.bench.quality --suite steady --out $OUT/quality-s13 --report-only
$PY docs/benchmarks/s14-2026-11-30/s14_analysis.py $OUT/quality-s13
$PY docs/benchmarks/s14-2026-11-30/s14_wrong_answers.py $OUT/quality-s13
