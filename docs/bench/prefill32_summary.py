#!/usr/bin/env python3
"""Summarises the prefill32 A/B: per run, the prefill the benchmark timed and
the daemon's own figures from its index_build / AppendKv lines.
Run from the repository root: python3 docs/bench/prefill32_summary.py"""
import glob
import re

for f in sorted(glob.glob('docs/bench/prefill32_*_daemon.txt')):
    tag = f.split('prefill32_')[1][:-len('_daemon.txt')]
    lines = open(f).read().splitlines()
    jobs = [l for l in lines if 'msg=index_build' in l]
    cpu = sum(int(re.search(r'cpu_us_per_tree=(\d+)', l).group(1)) *
              int(re.search(r' trees=(\d+)', l).group(1)) for l in jobs) / 1e6
    job_wall = sum(int(re.search(r' ms=(\d+)', l).group(1)) for l in jobs) / 1e3
    appends = [int(re.search(r'us=(\d+)', l).group(1)) / 1e3
               for l in lines if 'method=AppendKv' in l]
    m = re.search(r'^mdci\s+([\d.]+)\s+([\d.]+)', open(f'docs/bench/prefill32_{tag}.txt').read(),
                  re.M)
    prefill = float(m.group(2))
    print(f"{tag:6s} prefill {prefill:6.2f} s  tree CPU {cpu:5.1f} s ({cpu / (len(jobs) * 32) * 1e3:4.0f} ms"
          f" a tree)  beyond tree CPU / 2: {prefill - cpu / 2:4.2f} s  jobs' wall {job_wall:6.2f} s"
          f"  first AppendKv {appends[0]:5.0f} ms, slowest later {max(appends[1:8]):4.0f} ms")
