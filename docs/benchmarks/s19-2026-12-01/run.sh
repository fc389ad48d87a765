#!/bin/bash
# Session 19's runs, one command per run, in queue order (SCREEN.md, PREREG.md). Run from the
# repository root at the commit each part names; two of these side by side fill a 2-core CPU.
# Part 1, the screen (exploratory), into session 18's folder to pair with its runs:
q() { python -m gradsift.bench.quality --suite steady --threads 1 --quiet "$@"; }
for s in 10 11 12 13 14; do
  for v in "ftw@geometry=sgd" "ftw@subset=topk" "ftw@weighting=uniform" "ftw@subset=validated" \
           "ftw@subset=residual"; do
    q --out runs/quality-s18 --scenarios label-noise-1of8 --methods "$v" --seeds $s
  done
done
for s in 10 11; do q --out runs/quality-s18 --scenarios label-noise-1of8 --methods ftw-next-step --seeds $s; done
for s in 10 11 12; do
  for v in ftw "ftw@subset=residual"; do q --out runs/quality-s18 --scenarios redundancy --methods "$v" --seeds $s; done
done
for s in 10 11; do q --out runs/quality-s18 --scenarios redundancy --methods "ftw@subset=validated" --seeds $s; done
python docs/benchmarks/s19-2026-12-01/s19_screen.py runs/quality-s18
python docs/benchmarks/s19-2026-12-01/s19_picks.py runs/quality-s18
# Part 2, registered (fresh seeds 20-25):
for s in 20 21 22 23 24 25; do
  for m in "ftw@subset=topk" greats ftw; do
    q --out runs/quality-s19 --scenarios label-noise-1of8 --methods "$m" --seeds $s
  done
  if [ $s -le 24 ]; then
    for m in "ftw@subset=topk" ftw; do q --out runs/quality-s19 --scenarios redundancy --methods "$m" --seeds $s; done
  fi
done
python docs/benchmarks/s19-2026-12-01/s19_part2.py runs/quality-s19
