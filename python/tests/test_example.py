"""Smoke runs of python/examples/decode_llama.py (model and KV-dump modes)
and of the overhead benchmark's Python side."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, icecached_path

pytest.importorskip("torch")
EXAMPLE = ROOT / "python/examples/decode_llama.py"


def run(args, tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, ICECACHE_ICECACHED=icecached_path())
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), *args, "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text())["rows"]


def test_model_mode_smoke(tmp_path):
    stdout, rows = run(["--context", "512", "--steps", "3", "--layers", "2",
                        "--policies", "mdci,mdci-r2,quest,streaming"], tmp_path)
    assert [r["policy"] for r in rows] == ["full KV", "mdci", "mdci-r2", "quest", "streaming"]
    for r in rows[1:]:
        assert 0.0 <= r["greedy_agree"] <= 1.0
        assert r["logits_err_mean"] > 0  # budget 256 of 512+ tokens: sparse, not exact
    assert "greedy agree" in stdout


def test_model_mode_full_budget_matches_full_kv(tmp_path):
    _, rows = run(["--context", "256", "--steps", "2", "--layers", "2", "--budget", "1024",
                   "--policies", "mdci,quest"], tmp_path)
    for r in rows[1:]:
        assert r["logits_err_max"] < 1e-3 and r["greedy_agree"] == 1.0


def test_kv_dump_mode(tmp_path):
    kvgen = os.environ.get("ICECACHE_KVGEN") or str(ROOT / "build/common/icecache-kvgen")
    if not os.access(kvgen, os.X_OK):
        pytest.skip(f"icecache-kvgen not built at {kvgen}: set ICECACHE_KVGEN")
    dump = tmp_path / "dump"
    subprocess.run([kvgen, "--preset", "small", "--tokens", "1024", "--layers", "2", "--steps", "2",
                    "--out", str(dump)], check=True, capture_output=True, timeout=300)
    stdout, rows = run(["--kv-dump", str(dump), "--policies", "mdci,exact", "--budget", "128"], tmp_path)
    assert [r["policy"] for r in rows] == ["mdci", "exact"]
    assert all(0 < r["attn_err_mean"] < 1 for r in rows)
