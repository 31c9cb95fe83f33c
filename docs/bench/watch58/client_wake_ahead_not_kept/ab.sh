#!/bin/bash
cd /work/main/build
for r in A B B A; do
  if [ $r = A ]; then unset XWAKE; else export XWAKE=${W:-250}; fi
  tests/bench/icecache-bench-decode --spawn server/icecached --layers 8 --contexts 32768 --steps 200 --budget 256 --daemon-prefault --no-progress --policies mdci,mdci-r4+pf+ip > /tmp/e/wake/$r.$(date +%H%M%S).txt 2>&1
done
echo done > /tmp/e/wake/DONE
