#!/bin/bash
cd /work/main/build
for r in A B B A A B; do
  if [ $r = A ]; then X=""; else X="decode_lanes { spin_us: 4000 }"; fi
  tests/bench/icecache-bench-decode --spawn server/icecached --layers 8 --contexts 32768 --steps 200 --budget 256 --daemon-prefault --no-progress --policies mdci-r4+pf+ip --daemon-config "$X" > /tmp/e/spin/$r.$(date +%H%M%S).txt 2>&1
done
echo done > /tmp/e/spin/DONE
