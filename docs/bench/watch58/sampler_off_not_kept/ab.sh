#!/bin/bash
cd /work/main/build
run() { # name extra
  tests/bench/icecache-bench-decode --spawn server/icecached --layers 8 --contexts 32768 --steps 200 --budget 256 --daemon-prefault --no-progress --policies mdci,mdci-r4+pf+ip "$@"
}
for r in A B B A; do
  if [ $r = A ]; then run > /tmp/e/samp/$r.$(date +%H%M%S).txt 2>&1; else run --daemon-config 'quality { cpu_share: 0.001 burst_ms: 1 }' > /tmp/e/samp/$r.$(date +%H%M%S).txt 2>&1; fi
done
echo done > /tmp/e/samp/DONE
