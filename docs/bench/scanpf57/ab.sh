#!/bin/bash
# A/B: the scan's prefetch (pf4) against none (pf0), 32 layers x 32768, mdci, alternated.
cd /work/main
for run in "$@"; do
  d=/tmp/e/icecached_${run%_*}
  timeout 590 build/tests/bench/icecache-bench-decode --spawn $d --layers 32 --contexts 32768 --steps 120 --budget 256 --daemon-prefault --no-progress --policies mdci,mdci-r4+pf+ip --json /tmp/e/ab57_$run.json > /tmp/e/ab57_$run.txt 2>&1
  echo "$run $(date +%H:%M) $(grep -E '^mdci ' /tmp/e/ab57_$run.txt | head -1)"
  echo "$run $(date +%H:%M) $(grep -E '^mdci-r4' /tmp/e/ab57_$run.txt | head -1)"
done
