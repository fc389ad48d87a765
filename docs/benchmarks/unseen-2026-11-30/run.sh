#!/bin/bash
# The one-step comparison on two targets the suite never used (PREREG.md), and the demo
# comparison at today's defaults (PREREG.md, amendment 1). Run from the repository root after
# `make test` (it installs everything) and `apt-get install fortunes-min wordnet-base`.
# Two processes side by side, one thread each: ~50 min for the first part, ~45 for the second
# on a 2-core CPU.
set -euo pipefail
PY=.venv/bin/python
OUT=${OUT:-runs}
for t in definition aphorism; do
  $PY -m gradsift.cli data build --target $t --out $OUT/unseen/$t --seed 0 \
      --n-stream 1200 --n-target 400
done
for t in definition aphorism; do
  $PY -m gradsift.bench.branch --suite full --out $OUT/branch-unseen \
      --stream $OUT/unseen/$t/stream.jsonl --target $OUT/unseen/$t/target.jsonl \
      --name unseen-$t --methods ftw,greats,cosine,random --seeds 0,1,2,3,4,5,6,7 \
      --threads 1 --quiet &
done
wait
$PY -m gradsift.bench.branch --suite full --out $OUT/branch-unseen --report-only \
    --scenarios unseen-definition,unseen-aphorism --methods ftw,greats,cosine,random

# the demo's data, as `gradsift demo` builds it, and its config pointed at it
$PY - "$OUT/demo10" <<'PYEOF'
import sys
from pathlib import Path
from gradsift.demo import DEMO_CONFIG, DEMO_SOURCES
from gradsift.sources import build_stream
out = Path(sys.argv[1]).absolute()
build_stream("arithmetic", out / "data", seed=0, n_stream=3000, n_target=120,
             sources=DEMO_SOURCES)
text = DEMO_CONFIG.read_text()
text = text.replace("stream: data/stream.jsonl", f"stream: {out}/data/stream.jsonl")
text = text.replace("target: data/target.jsonl", f"target: {out}/data/target.jsonl")
(out / "demo.yaml").write_text(text)
PYEOF
for half in "a 0,1,2,3,4" "b 5,6,7,8,9"; do
  set -- $half
  OMP_NUM_THREADS=1 $PY -m gradsift.cli compare --quiet --config $OUT/demo10/demo.yaml \
      --methods ftw,greats,cosine,random --seeds $2 --out $OUT/demo10/$1 &
done
wait

# amendment 2: four steps from each state on the new targets (exploratory)
for t in definition aphorism; do
  $PY -m gradsift.bench.branch --suite full --out $OUT/branch-unseen-h4 \
      --stream $OUT/unseen/$t/stream.jsonl --target $OUT/unseen/$t/target.jsonl \
      --name unseen-$t --methods ftw,greats,cosine,random --horizon 4 --seeds 0,1,2,3 \
      --threads 1 --quiet &
done
wait

# amendment 3: a one-step screen of two options (exploratory)
for sc in label-noise code; do
  $PY -m gradsift.bench.branch --suite full --out $OUT/branch-screen --scenarios $sc \
      --methods ftw,ftw@momentum_correction=true,ftw-next-step-weights,cosine,random \
      --seeds 0,1,2 --threads 1 --quiet &
done
wait
