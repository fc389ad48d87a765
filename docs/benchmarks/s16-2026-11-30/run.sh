#!/bin/bash
# Session 16's runs (PREREG.md in this folder), from the repository root after `make test`.
# On the 2-core CPU they ran as two processes of one thread each taking (scenario, methods,
# seed) jobs from one queue in the order below, stopped at 01:20 UTC; here the two halves run
# side by side to the end. The out folder is the one of sessions 13-15 (label-noise-1of8's
# seeds 0-7 of ftw and greats and 0-5 of cosine came from session 15).
set -euo pipefail
PY=.venv/bin/python
OUT=${OUT:-runs}
q() { local sc=$1 methods=$2; shift 2; for s in "$@"; do $PY -m gradsift.bench.quality \
      --suite steady --out $OUT/quality-s13 --scenarios $sc --methods $methods --seeds $s \
      --threads 1 --quiet; done; }
half() {  # the seeds of one worker
  q label-noise-1of8 ftw,greats,cosine "$@"; q label-noise-1of8 random "$@"
  for s in "$@"; do q redundancy opus,loss,gradnorm $s; q label-noise opus,loss,gradnorm $s; done
}
half 0 2 4 6 8 & half 1 3 5 7 9 &
wait
$PY -m gradsift.bench.quality --suite steady --out $OUT/quality-s13 --report-only --quiet
$PY docs/benchmarks/s16-2026-11-30/s16_analysis.py $OUT/quality-s13
