#!/bin/bash
# Session 12's runs (PREREG.md in this folder), from the repository root after `make test`
# (it installs everything). On the 2-core CPU they ran as two processes of one thread each
# taking jobs from one queue (A3, B20, B21, A4, ...); here each half runs side by side.
set -euo pipefail
PY=.venv/bin/python
OUT=${OUT:-runs}

# parts A and B: per seed, every method in one call (a stopped run leaves complete sets)
a() { for s in "$@"; do $PY -m gradsift.bench.quality --suite full --out $OUT/quality-s12 \
      --scenarios label-noise-1of8 --methods ftw,greats,cosine --seeds $s --threads 1 --quiet; done; }
b() { for s in "$@"; do $PY -m gradsift.bench.quality --suite full --out $OUT/quality-s12 \
      --scenarios redundancy --methods ftw,greats,gradnorm,cosine --seeds $s --threads 1 --quiet; done; }
(a $(seq 3 12); b $(seq 20 24)) &
b $(seq 25 39) &
wait
$PY -m gradsift.bench.quality --out $OUT/quality-s12 --report-only
$PY docs/benchmarks/s12-2026-11-30/s12_pool.py $OUT/quality-s12/summary.json

# the reproducibility check (not registered): redundancy seeds 0-2 of ftw and GREATS today
$PY -m gradsift.bench.quality --suite full --out $OUT/quality-s12-check --scenarios redundancy \
    --methods ftw,greats --seeds 0,1,2 --threads 1 --quiet

# part C (amendments 1, 1b): the oracle with its table on redundancy, then the rules offline
for s in 0 1; do
  $PY -m gradsift.bench.branch --suite full --out $OUT/branch-oracle-s12 --scenarios redundancy \
      --methods ftw,greats,cosine,random,oracle --seeds $s,$((s + 2)) --threads 1 --quiet &
done
wait
$PY docs/benchmarks/s12-2026-11-30/oracle_rules.py $OUT/branch-oracle-s12/redundancy/ref-random/seed_*/branch.json
