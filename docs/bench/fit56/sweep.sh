#!/bin/bash
# quality sweep: every preset, PQ scan (pq 8) and the tree, insert fit 0 vs 2
M=/tmp/e/measure
mkdir -p /tmp/e/sweep
for p in llama3-8b-like mistral-7b-like baseline gqa-divergent temperature-spread shifted-queries heavy-sinks local-heads rare-needles scattered-topics heavy-tailed-norms drifting-queries mixture; do
  for f in 0 2; do
    $M --preset $p --tokens 32768 --kv-heads 4 --steps 24 --decode-from 16384 --insert-fit $f --pq 8 > /tmp/e/sweep/pq_${p}_$f.txt 2>&1 &
    $M --preset $p --tokens 32768 --kv-heads 4 --steps 24 --decode-from 16384 --insert-fit $f > /tmp/e/sweep/tree_${p}_$f.txt 2>&1
    wait
  done
done
echo done > /tmp/e/sweep/DONE
