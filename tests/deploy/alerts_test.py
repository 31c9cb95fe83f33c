#!/usr/bin/env python3
"""The Prometheus alert rules in deploy/prometheus/ are well formed and watch
metrics the daemon really exports.

Parses every rule file, checks each rule has what an on-call person needs
(alert name, expression, a `for` duration, a severity, a summary and a
description), that every icecache_* series an expression reads is exported by
a live icecached (started here, its /metrics scraped), and runs
`promtool check rules` where promtool is installed.

usage: alerts_test.py SOURCE_DIR ICECACHED
"""
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

import yaml

SOURCE_DIR, ICECACHED = sys.argv[1:3]
RULE_FILES = sorted(glob.glob(os.path.join(SOURCE_DIR, "deploy/prometheus/*.yaml")))
DURATION = re.compile(r"^\d+[smhd]$")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_live_daemon():
    """Families (# TYPE lines) of a freshly started icecached's /metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = subprocess.Popen(
            [ICECACHED, f"--socket={tmp}/d.sock", f"--metrics-port={port}", "--log-level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                        text = r.read().decode()
                    break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        raise AssertionError("icecached did not serve /metrics: " +
                                             proc.stderr.read().decode()[-2000:])
                    time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            proc.stderr.close()
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def series_names(expr):
    return set(re.findall(r"\b(icecache_[a-z0-9_]+)", expr))


class AlertRulesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.rules = []
        for path in RULE_FILES:
            with open(path) as f:
                doc = yaml.safe_load(f)
            for group in doc["groups"]:
                for rule in group["rules"]:
                    cls.rules.append((path, group["name"], rule))
        cls.families = scrape_live_daemon()

    def test_there_are_rules(self):
        self.assertTrue(RULE_FILES, "no rule files under deploy/prometheus")
        names = [r["alert"] for _, _, r in self.rules]
        self.assertEqual(len(names), len(set(names)), f"alert names repeat: {names}")
        for wanted in ("IcecacheSelectionMassRatioLow", "IcecacheQualitySamplingStalled"):
            self.assertIn(wanted, names)

    def test_every_rule_says_what_an_operator_needs(self):
        for path, group, r in self.rules:
            where = f"{path} {group}/{r.get('alert')}"
            self.assertTrue(r.get("alert"), where)
            self.assertTrue(r.get("expr", "").strip(), where)
            self.assertRegex(str(r.get("for", "")), DURATION, where + ": `for` is a duration")
            self.assertIn(r.get("labels", {}).get("severity"), ("info", "warning", "critical"),
                          where)
            for key in ("summary", "description"):
                self.assertTrue(r.get("annotations", {}).get(key), f"{where}: no {key}")
            self.assertEqual(r["expr"].count("("), r["expr"].count(")"), where)

    def test_expressions_read_series_the_daemon_exports(self):
        for path, group, r in self.rules:
            for name in series_names(r["expr"]):
                family = re.sub(r"_(bucket|sum|count)$", "", name)
                if family != name:
                    self.assertEqual(self.families.get(family), "histogram",
                                     f"{r['alert']}: {name} needs a histogram {family}")
                else:
                    self.assertIn(name, self.families, f"{r['alert']}: {name} is not exported")

    def test_histogram_bucket_bounds_exist(self):
        # le="0.9" must be a bucket bound of the ratio histograms, or the
        # series is empty and the rule never fires.
        for path, group, r in self.rules:
            for le in re.findall(r'le="([^"]+)"', r["expr"]):
                self.assertIn(le, ("0.5", "0.6", "0.7", "0.8", "0.85", "0.9", "0.93", "0.95",
                                   "0.965", "0.98", "0.99", "1", "+Inf"),
                              f"{r['alert']}: le={le} is not a bound of RatioBuckets()")

    @unittest.skipUnless(shutil.which("promtool"), "promtool not installed")
    def test_promtool_accepts_the_rules(self):
        for path in RULE_FILES:
            r = subprocess.run(["promtool", "check", "rules", path], capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
