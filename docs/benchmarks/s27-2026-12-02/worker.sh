#!/bin/bash
# One worker of the registered queue: takes the next job line of JOBS that no other worker
# has claimed (an atomic mkdir per line) and runs it; two of these ran side by side.
#   bash worker.sh JOBS LOCKDIR
set -uo pipefail
jobs=$1 locks=$2
mkdir -p "$locks"
n=0
while IFS= read -r line; do
  n=$((n + 1))
  mkdir "$locks/$n" 2>/dev/null || continue
  echo "$(date -u +%T) start $n: $line"
  bash -c "$line" < /dev/null
  echo "$(date -u +%T) end $n rc=$?"
done < "$jobs"
