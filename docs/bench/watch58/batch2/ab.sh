#!/bin/bash
# new / old daemon alternated, 32 layers x 32768 tokens
cd /work/main/build
for r in ${ORDER:-new old old new}; do
  tests/bench/icecache-bench-decode --spawn /tmp/e/${r}_icecached --layers 32 --contexts 32768 --steps 120 --budget 256 --daemon-prefault --no-progress --policies mdci,mdci-r4+pf+ip --json /tmp/e/w58b/decode32_${r}_$(date +%H%M).json > /tmp/e/w58b/decode32_${r}_$(date +%H%M).txt 2>&1
done
echo done > /tmp/e/w58b/DONE
